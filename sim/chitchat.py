"""Real human chit-chat from the PyPI package ``chitchat-dataset`` (7,168 conversations).

Used for simulated users' conversation openers and to calibrate how long their messages are.
Conversations (exact duplicates dropped: 6,233 remain) are split once, by a seeded
permutation, into a *train* part (openers and lengths the simulation draws from) and a
*held-out* part kept for evaluation, so that what the flywheel learns can be checked on
openers it never saw, and simulated users are measured against human chat they were not
built from (``flywheel fidelity``).

A message is the dataset's consecutive utterances of one speaker joined with a space.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np

from rewards.checkers import words

Split = Literal["train", "heldout"]
MAX_OPENER_WORDS = 60  # longer first messages are essays, not openers


@dataclass(frozen=True)
class ChitchatCorpus:
    """The dataset's conversations, split into train and held-out parts."""

    train: tuple[tuple[str, ...], ...]
    heldout: tuple[tuple[str, ...], ...]
    seed: int
    heldout_fraction: float

    def conversations(self, split: Split = "train") -> tuple[tuple[str, ...], ...]:
        """Conversations (tuples of messages) of ``split``."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        return self.train if split == "train" else self.heldout

    def openers(self, split: Split = "train") -> list[str]:
        """First messages with 1..``MAX_OPENER_WORDS`` words."""
        return [
            conv[0]
            for conv in self.conversations(split)
            if conv and 1 <= len(words(conv[0])) <= MAX_OPENER_WORDS
        ]

    def replies(self, split: Split = "train") -> list[str]:
        """Every non-first message with at least one word (human follow-up messages)."""
        return [m for conv in self.conversations(split) for m in conv[1:] if words(m)]

    def message_words(self, split: Split = "train") -> np.ndarray:
        """Word count of every message with at least one word."""
        counts = [len(words(m)) for conv in self.conversations(split) for m in conv]
        return np.array([c for c in counts if c > 0], dtype=int)

    def messages_per_conversation(self, split: Split = "train") -> np.ndarray:
        """Number of messages in each conversation (both speakers)."""
        return np.array([len(conv) for conv in self.conversations(split)], dtype=int)

    def opener_messages_per_conversation(self, split: Split = "train") -> np.ndarray:
        """Messages the opening speaker sent in each conversation (speakers alternate, so
        ``ceil(n / 2)`` of ``n``): a simulated user's messages per session are compared with it.
        """
        return (self.messages_per_conversation(split) + 1) // 2


@functools.cache
def load_chitchat(heldout_fraction: float = 0.2, seed: int = 0) -> ChitchatCorpus:
    """Load and split the packaged dataset (cached per arguments)."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(
            f"chitchat heldout_fraction must be in (0, 1), got {heldout_fraction}; e.g. 0.2"
        )
    import chitchat_dataset

    data = chitchat_dataset.Dataset()
    # Some conversations appear under several ids; keep one copy so that no held-out
    # conversation is also in train.
    unique = {}
    for conv_id in sorted(data):
        messages = tuple(
            " ".join(u["text"].strip() for u in msg).strip() for msg in data[conv_id]["messages"]
        )
        unique.setdefault(messages, conv_id)
    convs = list(unique)
    order = np.random.default_rng(seed).permutation(len(convs))
    n_heldout = round(heldout_fraction * len(convs))
    convs = [convs[i] for i in order]
    return ChitchatCorpus(
        train=tuple(convs[n_heldout:]),
        heldout=tuple(convs[:n_heldout]),
        seed=seed,
        heldout_fraction=heldout_fraction,
    )
