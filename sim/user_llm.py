"""LLM-simulated users: an LLM role-plays each user and writes their next message.

The latent model (``sim.gold``) decides *whether* a user stays, likes, reports and returns;
this module only writes *what* they say. Every call writes the next message of many
conversations with ONE ``Policy.generate`` call (that is where the throughput is).

- Openers are real first messages from ``chitchat-dataset`` (train split; the held-out
  split is kept for evaluation), so conversations start the way people start them.
- Length calibration: each user has a typical message length (``UserTraits.message_words``,
  drawn from the dataset's message lengths by the sampler); the prompt asks for about that
  many words and ``clean_message`` cuts the LLM's text to ``length_cap_factor`` times it.
- The chat sent to the LLM is the conversation seen from the user's side: the user's own
  messages become ``assistant`` turns and the character's replies ``user`` turns, after a
  system prompt describing who the user is.
- LLM output is cleaned: role prefixes ("User:", "Captain Mara:") stripped, text after a
  new speaker label or a blank line dropped, wrapping quotes removed, length capped. When
  nothing usable remains, a real human follow-up message from the train split is used
  instead. ``UserSimulator.messages`` counts the messages the LLM was asked to write and
  ``UserSimulator.fallbacks`` how many of them were replaced; the traffic model stores
  both per day, and the reports show the share per experiment.
- Optional planted PII (e-mails, phone numbers, street addresses from ``faker``) at
  ``pii_rate`` per message, so curation can prove it scrubs them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from policies.base import Chat, Message, Policy, SamplingParams
from rewards.checkers import WORD_RE
from sim.chitchat import ChitchatCorpus

if TYPE_CHECKING:
    from sim.characters import Character
    from sim.population import User

GENERIC_SPEAKERS = ("user", "me", "you", "assistant", "bot", "human", "ai", "system", "character")
PII_TEMPLATES = {
    "email": ("btw my email is {}", "you can email me at {}", "my mail is {} if you want"),
    "phone": ("my number is {}", "text me at {}", "call me sometime, {}"),
    "address": ("I live at {}", "my address is {}", "come visit, {}"),
}


def _speaker_prefix_re(names: Sequence[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    return re.compile(rf"^\s*[\*\"']*(?:{alternatives})[\*\"']*\s*[:：][\*]*\s*", re.IGNORECASE)


def _speaker_label_re(names: Sequence[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    return re.compile(rf"\n\s*[\*\"']*(?:{alternatives})[\*\"']*\s*[:：]", re.IGNORECASE)


def truncate_words(text: str, max_words: int) -> str:
    """``text`` cut to at most ``max_words`` ``\\w+`` words (unchanged if shorter).

    The cut goes back to the last sentence end ('.', '!', '?') inside the kept part when
    that keeps at least half of ``max_words``, so messages rarely stop mid-sentence.
    """
    matches = list(WORD_RE.finditer(text))
    if len(matches) <= max_words:
        return text
    end = matches[max_words - 1].end()
    # Keep punctuation glued to the last kept word ("great!" stays "great!").
    while end < len(text) and not text[end].isspace() and not WORD_RE.match(text[end]):
        end += 1
    kept = text[:end]
    sentence_ends = [m.end() for m in re.finditer(r"[.!?]+", kept)]
    if sentence_ends and len(WORD_RE.findall(kept[: sentence_ends[-1]])) >= max_words / 2:
        return kept[: sentence_ends[-1]]
    return kept


def clean_message(text: str, speaker_names: Sequence[str], max_words: int) -> str:
    """Strip role prefixes, later speaker turns, wrapping quotes; cap at ``max_words`` words."""
    names = [*GENERIC_SPEAKERS, *speaker_names]
    prefix = _speaker_prefix_re(names)
    previous = None
    while previous != text:
        previous = text
        text = prefix.sub("", text.strip())
    label = _speaker_label_re(names).search(text)
    if label:
        text = text[: label.start()]
    text = re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0]
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return truncate_words(text, max_words).strip()


class UserSimulator:
    """Writes simulated users' messages with an LLM, batched across conversations.

    Args:
        policy: the user LLM (any ``policies`` backend).
        corpus: the chit-chat corpus (openers, fallback messages).
        pii_rate: probability that a user message gets a planted PII sentence.
        length_cap_factor: messages are cut to this many times the user's typical length.
        min_words_cap: the cap is never below this many words.
        split: which corpus split openers come from ("train"; "heldout" for evaluation).
    """

    def __init__(
        self,
        policy: Policy,
        corpus: ChitchatCorpus,
        pii_rate: float = 0.0,
        length_cap_factor: float = 2.0,
        min_words_cap: int = 12,
        split: str = "train",
    ) -> None:
        if not 0 <= pii_rate <= 1:
            raise ValueError(f"pii_rate must be in [0, 1], got {pii_rate}")
        if length_cap_factor <= 0:
            raise ValueError(f"length_cap_factor must be > 0, got {length_cap_factor}")
        self.policy = policy
        self.corpus = corpus
        self.pii_rate = pii_rate
        self.length_cap_factor = length_cap_factor
        self.min_words_cap = min_words_cap
        self._openers = corpus.openers(split)  # type: ignore[arg-type]
        self._replies = corpus.replies(split)  # type: ignore[arg-type]
        if not self._openers:
            raise ValueError(f"the chit-chat corpus has no openers in split {split!r}")
        self.messages = 0
        self.fallbacks = 0
        self._faker = None

    def word_cap(self, user: User) -> int:
        """Most words a message of ``user`` may have."""
        return max(self.min_words_cap, round(self.length_cap_factor * user.traits.message_words))

    def opener(self, user: User, rng: np.random.Generator) -> str:
        """A real human first message, capped to the user's length."""
        text = self._openers[int(rng.integers(len(self._openers)))]
        return truncate_words(text, self.word_cap(user))

    def system_prompt(self, user: User, character: Character) -> str:
        """Who the LLM plays: the user, chatting with ``character``."""
        return (
            f"{user.profile} You are chatting with {character.name} in a chat app. "
            f"{character.name}: {character.persona}\n"
            "You are the human user, not an assistant: never offer help. React to what "
            f"{character.name} just said, share something about yourself or ask a question. "
            f"Write one casual message of about {user.traits.message_words} words. "
            "Never say you are an AI."
        )

    def user_chat(self, user: User, character: Character, messages: Sequence[Message]) -> Chat:
        """The conversation from the user's side (roles swapped), system prompt first."""
        swap = {"user": "assistant", "assistant": "user"}
        chat: Chat = [{"role": "system", "content": self.system_prompt(user, character)}]
        chat.extend({"role": swap[m["role"]], "content": m["content"]} for m in messages)
        return chat

    def maybe_plant_pii(self, text: str, rng: np.random.Generator) -> tuple[str, bool]:
        """Append a PII sentence with probability ``pii_rate``; returns (text, planted)."""
        if self.pii_rate == 0 or rng.random() >= self.pii_rate:
            return text, False
        if self._faker is None:
            from faker import Faker

            self._faker = Faker("en_US")
        self._faker.seed_instance(int(rng.integers(2**31 - 1)))
        kind = ("email", "phone", "address")[int(rng.integers(3))]
        value = {
            "email": self._faker.email,
            "phone": self._faker.phone_number,
            "address": lambda: self._faker.address().replace("\n", ", "),
        }[kind]()
        templates = PII_TEMPLATES[kind]
        sentence = templates[int(rng.integers(len(templates)))].format(value)
        return f"{text} {sentence}".strip(), True

    def next_messages(
        self,
        users: Sequence[User],
        characters: Sequence[Character],
        conversations: Sequence[Sequence[Message]],
        params: SamplingParams,
        rngs: Sequence[np.random.Generator],
    ) -> list[tuple[str, bool]]:
        """The next message of every conversation with ONE policy call.

        Returns ``(message, pii_planted)`` per conversation. ``rngs`` (one per conversation)
        drive fallbacks and PII planting, so results do not depend on batch composition
        beyond what the LLM's own sampling does.
        """
        if not len(users) == len(characters) == len(conversations) == len(rngs):
            raise ValueError(
                "next_messages needs one user, character, conversation and rng each; got "
                f"{len(users)}, {len(characters)}, {len(conversations)}, {len(rngs)}"
            )
        if not users:
            return []
        triples = zip(users, characters, conversations, strict=True)
        chats = [self.user_chat(u, c, m) for u, c, m in triples]
        generations = self.policy.generate(chats, params)
        out = []
        for user, character, gen, rng in zip(users, characters, generations, rngs, strict=True):
            text = clean_message(gen.text, [character.name], self.word_cap(user))
            self.messages += 1
            if not WORD_RE.search(text):
                self.fallbacks += 1
                text = truncate_words(
                    self._replies[int(rng.integers(len(self._replies)))], self.word_cap(user)
                )
            out.append(self.maybe_plant_pii(text, rng))
        return out
