"""Multi-turn GRPO: whole conversations between the policy and the other side, driven by
TRL's ``GRPOTrainer`` through its ``rollout_func``.

A dataset row opens one conversation: ``{"prompt": [system, first user message],
"character": name, ...}`` plus whatever keys the other side needs to open it again (a user
and a seed). TRL's sampler repeats each row ``num_generations`` times, so the G
conversations of a group start from the same row: the same user, the same opener and, where
the other side draws with the row's seed, the same random numbers on the user side (common
random numbers); only the policy's samples differ.

One rollout, for the rows of one generation batch (``roll_out``):

1. the other side opens every conversation (``UserSide.open``);
2. the policy answers every open conversation with ONE batched call of the trainer's own
   generation (``GRPOTrainer._generate_single_turn``: transformers' ``generate`` on CPU,
   vLLM where configured), at the trainer's sampling and ``max_completion_length`` a turn;
3. the other side answers every reply with one batched call (``UserSide.reply``), or says
   the conversation ended; 2 and 3 repeat up to ``max_bot_turns`` replies.

What TRL trains on: ``prompt_ids`` = the system prompt and the opener, as the trainer
tokenises a prompt; ``completion_ids`` = every later token, the policy's replies and the
user's turns between them (with the template's headers); ``env_mask`` (TRL's field for
tokens the environment wrote, kept as ``tool_mask``): 1 on the tokens the policy sampled, 0
on every other. TRL multiplies it into the loss mask, so the loss, the KL term and the
entropy see the policy's tokens only, and computes every log-probability itself (no
``logprobs`` are handed over from CPU generation).

The reward is a conversation-level return (``ConversationReturn``): each single-turn
reward of ``training.rewards`` (reward model, steerability, artifact penalty, held rates
counted) scores every policy turn with the conversation up to it as its prompt, and the
turns' rewards are averaged. Only what the flywheel may see enters it; the other side's
oracle, if it has one, stays on its side of ``UserSide``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from policies.base import Chat
from training.anchor import AnchoredGRPOTrainer
from training.rewards import check_rewards

AGGREGATES = ("mean", "sum")
# Reward kwargs that are not one value per conversation: passed to each turn as they are.
_SHARED_KWARGS = ("trainer_state", "log_extra", "log_metric", "environments")


class UserSide(Protocol):
    """The other side of the conversations a multi-turn rollout holds.

    Stateful across one rollout: ``open`` starts a new set of conversations (and forgets
    the previous set); ``reply`` is then called once per policy turn with the conversations
    still open.
    """

    def open(self, rows: Sequence[Mapping[str, Any]]) -> list[Chat]:
        """Start one conversation per dataset row; return each one as the policy sees it
        (system prompt and the user's first message), which must be the row's ``prompt``."""
        ...

    def reply(self, conversations: Sequence[int], replies: Sequence[str]) -> list[str | None]:
        """The user's next message in each conversation ``conversations[i]`` (indices into
        ``open``'s list) after the policy's ``replies[i]``, or None where the user ended it.
        One batched call for all of them."""
        ...


@dataclass(frozen=True)
class MultiTurnSettings:
    """How long a training conversation runs and how its turns' rewards combine.

    Attributes:
        max_bot_turns: most policy replies in one training conversation (the other side may
            end it sooner); each reply is up to the GRPOConfig's ``max_completion_length``.
        aggregate: ``mean`` of each reward over the policy's turns (a reward keeps the unit
            it has on one reply, so the single-turn weights and reference scales still
            hold, and a conversation is not paid for its length by a reward that is
            positive everywhere), or ``sum``.
    """

    max_bot_turns: int = 3
    aggregate: str = "mean"

    def __post_init__(self) -> None:
        if self.max_bot_turns < 1 or self.aggregate not in AGGREGATES:
            raise ValueError(
                f"MultiTurnSettings max_bot_turns={self.max_bot_turns}, aggregate="
                f"{self.aggregate!r}; fix: max_bot_turns >= 1, aggregate in {AGGREGATES}"
            )


def _render(trainer: Any, chat: Chat, add_generation_prompt: bool) -> str:
    return trainer.processing_class.apply_chat_template(
        chat,
        chat_template=trainer.chat_template,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        **trainer.chat_template_kwargs,
    )


def user_turn_ids(trainer: Any, chat: Chat, message: str) -> list[int]:
    """The tokens between the end-of-turn token that closes ``chat``'s last (assistant)
    message and the policy's next reply to the user's ``message``: the rest of the closed
    turn, the user's turn and the assistant header, as the chat template writes them.

    Read as the difference of two renderings cut at the end-of-turn token, so that the
    policy's sampled tokens are kept as sampled, never re-tokenised.
    """
    tokenizer = trainer.processing_class
    end = tokenizer.eos_token
    before = _render(trainer, chat, add_generation_prompt=False)
    after = _render(trainer, [*chat, {"role": "user", "content": message}], True)
    cut = before.rfind(end) + len(end)
    if cut < len(end) or not after.startswith(before[:cut]):
        raise ValueError(
            f"the chat template does not close an assistant message with the end-of-turn "
            f"token {end!r} the policy samples, so the user's turn cannot be cut out of it; "
            "fix: a chat template that ends each turn with the tokenizer's eos_token"
        )
    return tokenizer(after[cut:], add_special_tokens=False)["input_ids"]


@dataclass
class _Conversation:
    """One conversation being rolled out: its chat and the tokens after the prompt."""

    chat: Chat
    prompt_ids: list[int]
    completion_ids: list[int]
    env_mask: list[int]
    logprobs: list[float]
    turns: list[dict[str, Any]]


def roll_out(
    rows: Sequence[Mapping[str, Any]], trainer: Any, users: UserSide, max_bot_turns: int
) -> dict[str, Any]:
    """Whole conversations for ``rows`` (a generation batch, groups adjacent), in the
    format of TRL's ``rollout_func``: ``prompt_ids``, ``completion_ids``, ``logprobs``
    (None unless the generation backend returns them), ``env_mask`` (1 = a token the policy
    sampled), and ``turns`` for the rewards: per conversation, each policy turn's
    ``context`` (the chat it answered) and ``reply``."""
    chats = users.open(rows)
    for i, (row, chat) in enumerate(zip(rows, chats, strict=True)):
        if [dict(m) for m in chat] != [dict(m) for m in row["prompt"]]:
            raise ValueError(
                f"row {i}: the other side opened {chat!r} but the row's prompt is "
                f"{row['prompt']!r}; fix: build the rows with the same other side (its "
                "openings must be reproducible from a row, or groups share no user)"
            )
    prompt_ids = trainer._tokenize_prompts([list(c) for c in chats])[0]
    talks = [
        _Conversation([dict(m) for m in c], list(p), [], [], [], [])
        for c, p in zip(chats, prompt_ids, strict=True)
    ]
    eos = trainer.processing_class.eos_token_id
    live = list(range(len(talks)))
    for turn in range(max_bot_turns):
        contexts = [talks[i].prompt_ids + talks[i].completion_ids for i in live]
        sampled, logprobs = trainer._generate_single_turn(contexts, None, {}, 1)
        replies = trainer.processing_class.batch_decode(sampled, skip_special_tokens=True)
        for k, i in enumerate(live):
            talk = talks[i]
            talk.turns.append({"context": [dict(m) for m in talk.chat], "reply": replies[k]})
            talk.completion_ids += list(sampled[k])
            talk.env_mask += [1] * len(sampled[k])
            talk.logprobs += list(logprobs[k]) if logprobs is not None else [0.0] * len(sampled[k])
            talk.chat.append({"role": "assistant", "content": replies[k]})
        if turn == max_bot_turns - 1:
            break
        answers = users.reply(live, replies)
        still = []
        for k, (i, answer) in enumerate(zip(live, answers, strict=True)):
            if answer is None:
                continue
            talk = talks[i]
            # A reply cut at max_completion_length is closed for the user's turn; the
            # policy did not write that end-of-turn token, so it is not trained on.
            closing = [] if sampled[k] and sampled[k][-1] in trainer.eos_token_ids else [eos]
            written = closing + user_turn_ids(trainer, talk.chat, answer)
            talk.completion_ids += written
            talk.env_mask += [0] * len(written)
            talk.logprobs += [0.0] * len(written)
            talk.chat.append({"role": "user", "content": answer})
            still.append(i)
        live = still
        if not live:
            break
    _log_rollout(trainer, talks)
    return {
        "prompt_ids": [t.prompt_ids for t in talks],
        "completion_ids": [t.completion_ids for t in talks],
        "logprobs": None if logprobs is None else [t.logprobs for t in talks],
        "env_mask": [t.env_mask for t in talks],
        "turns": [t.turns for t in talks],
    }


def _log_rollout(trainer: Any, talks: Sequence[_Conversation]) -> None:
    """``multiturn/policy_turns`` and ``multiturn/user_tokens``: conversation length and how
    many completion tokens the other side wrote (masked), per conversation."""
    mode = "train" if trainer.model.training else "eval"
    metrics = trainer._metrics[mode]
    metrics["multiturn/policy_turns"].append(float(np.mean([len(t.turns) for t in talks])))
    user_tokens = [len(t.env_mask) - sum(t.env_mask) for t in talks]
    metrics["multiturn/user_tokens"].append(float(np.mean(user_tokens)))


class ConversationReturn:
    """A single-turn reward as a conversation's return: ``reward`` scores every policy turn
    (its prompt = the conversation up to that turn, its completion = the reply) in one call,
    and each conversation gets the ``mean`` (or ``sum``) over its turns. Keeps the wrapped
    reward's ``__name__``, so weights and logs find it."""

    def __init__(self, reward: Any, aggregate: str = "mean") -> None:
        if getattr(reward, "estimate", None) == "tokens":
            raise ValueError(
                f"{reward.__name__} estimates its rate from token probabilities along one "
                "reply, which a multi-turn completion is not; fix: GRPORecipe(rate_estimate="
                "'count') (or no hold_rates)"
            )
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate {aggregate!r} is unknown; fix: one of {AGGREGATES}")
        self.reward = reward
        self.aggregate = aggregate
        self.__name__ = reward.__name__

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        turns = kwargs.get("turns")
        if turns is None or len(turns) != len(prompts):
            raise ValueError(
                f"{self.__name__} as a conversation return needs the rollout's 'turns' (one "
                "list per conversation); fix: train with MultiTurnGRPOTrainer"
            )
        owner = [i for i, talk in enumerate(turns) for _ in talk]
        per_row = {
            k: [v[i] for i in owner]
            for k, v in kwargs.items()
            if k not in (*_SHARED_KWARGS, "turns") and isinstance(v, list) and len(v) == len(turns)
        }
        shared = {k: v for k, v in kwargs.items() if k in _SHARED_KWARGS}
        values = self.reward(
            [t["context"] for talk in turns for t in talk],
            [[{"role": "assistant", "content": t["reply"]}] for talk in turns for t in talk],
            **per_row,
            **shared,
        )
        values = np.asarray(check_rewards(self.__name__, values, len(owner)))
        by_row = np.asarray(owner)
        returns = [
            float(getattr(np, self.aggregate)(values[by_row == i])) for i in range(len(turns))
        ]
        return check_rewards(self.__name__, returns, len(prompts))


class MultiTurnGRPOTrainer(AnchoredGRPOTrainer):
    """``AnchoredGRPOTrainer`` (credit masks, held rates) whose completions are whole
    conversations with ``users`` (``roll_out``). TRL hands ``rollout_func`` the prompts
    only; the trainer keeps the batch's rows for it, since the other side opens a
    conversation from a row's keys (user, seed), not from its text."""

    def __init__(
        self, *args: Any, users: UserSide, settings: MultiTurnSettings, **kwargs: Any
    ) -> None:
        if kwargs.get("anchors"):
            raise ValueError(
                "token anchors hold the feature mass at every completion position, and a "
                "multi-turn completion holds the user's tokens too; fix: GRPORecipe(anchors=())"
            )
        self.users = users
        self.settings = settings
        self._rows: list[dict[str, Any]] = []
        super().__init__(*args, rollout_func=self._rollout, **kwargs)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._rows = inputs
        return super()._generate_and_score_completions(inputs)

    def _rollout(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        """TRL's ``rollout_func``: ``prompts`` are the rows' prompts, which ``roll_out``
        checks against the other side's openings."""
        return roll_out(self._rows, self, self.users, self.settings.max_bot_turns)


def conversation_rewards(rewards: Sequence[Any], aggregate: str = "mean") -> list[Any]:
    """Each of ``rewards`` (a ``GRPOBuild``'s, in TRL's order) as a ``ConversationReturn``."""
    return [ConversationReturn(r, aggregate) for r in rewards]


def train_multiturn(
    build: Any,
    records: list[dict[str, Any]],
    users: UserSide,
    model_args: Any,
    out_dir: str | Path,
    settings: MultiTurnSettings | None = None,
    callbacks: Sequence[Any] = (),
) -> Path:
    """Run ``build`` (``training.recipes.build_grpo``: its rewards as conversation returns,
    its weights, credit masks and GRPOConfig) on conversations opened from ``records`` with
    ``users``; returns the merged checkpoint folder ``out_dir``."""
    from training.models import train_and_save

    settings = settings or MultiTurnSettings()
    if not records:
        raise ValueError("train_multiturn got no rows; fix: open conversations with the users")
    if build.anchors:
        raise ValueError("multi-turn GRPO takes no token anchors; fix: GRPORecipe(anchors=())")
    rewards = conversation_rewards(build.rewards, settings.aggregate)
    args = build.args
    args.reward_weights = [build.weights[r.__name__] for r in rewards]
    names = [r.__name__ for r in rewards]
    return train_and_save(
        MultiTurnGRPOTrainer, "grpo_multiturn", records, model_args, args, out_dir,
        extra_metrics={"reward_names": names, "max_bot_turns": settings.max_bot_turns},
        reward_funcs=rewards, callbacks=list(callbacks), credit_masks=list(build.credit_masks),
        users=users, settings=settings,
    )  # fmt: skip
