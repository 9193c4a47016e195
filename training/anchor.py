"""Token-mass anchors: keep the policy as likely as the base model to start a rare feature.

A rate of one emoji reply in forty cannot be held by rewards on sampled replies: a step
of 16 completions rarely holds one, so the policy learns "no emoji" from every reward
that sharpens it and hears about the rate a few times a run (benchmarks/README.md: a
Lagrangian ``RateConstraint`` held it on training prompts, not on held-out ones). Yet the
model says at *every* position how likely it is to start an emoji: the probability mass
of the tokens that begin one. The anchor adds to GRPO's loss, for the completions of the
characters it holds, the squared log ratio of that mass under the policy and under the
base model (LoRA disabled), at every completion position up to the first sampled feature
token, weighted by the mass itself so that the positions where an emoji is plausible
count. The policy may change what it says, not how readily it reaches for an emoji where
the base model would. Positions after the first emoji are not held: there a reply of
emoji has mass near 1, and those positions would outweigh every one where the choice is
made (held over every position, the mass can rise while the probability of starting an
emoji falls).

The anchor holds the part of the rate a reward cannot reach, how readily the policy starts
an emoji, and a ``RateConstraint(estimate="tokens")`` the other, where the policy goes
(``AnchoredGRPOTrainer`` computes the estimate it reads). Its cost: at ``coef = 1`` its
gradient is an order of magnitude larger than GRPO's, so clipping and Adam's scaling leave
GRPO little room; at ``coef = 0.1`` it holds the emoji mass in every context and with it
the whole model. No shipped recipe uses the anchor. What holds the propensity without
holding the model still is a ``CreditMask``: no advantage for the tokens that start the
feature where no reward sees it. benchmarks/README.md (``grpo_steerability.py``,
``emoji_propensity.py``) has the figures of each configuration.

The same mass, summed along a sampled reply, estimates without bias how many times a
reply has the feature, and summed up to its first use, how often a reply has it at all,
with far less variance than counting (``expected_features``; the tower rule:
E[sum_t 1{token_t in E}] = E[sum_t P(E | prefix_t)]). The GRPO benchmark reports both next
to the counted rates.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import emoji
import numpy as np
import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper
from transformers.convert_slow_tokenizer import bytes_to_unicode
from trl import GRPOTrainer
from trl.trainer.utils import use_adapter

from rewards.checkers import Checker
from training.rewards import characters_allowing, check_rate_feature

SEQUENCE_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
MIN_LOG_MASS = -30.0  # floor of log mass: a nucleus that drops every feature token is -inf
# What the nucleus filter leaves outside it: far below any logit, yet finite, so that a
# position whose nucleus drops every feature token has a zero gradient, not a NaN one.
OUTSIDE_NUCLEUS = -1e4
_BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}


def _token_bytes(token: str) -> bytes:
    """Raw bytes of a vocabulary entry: byte-level BPE (GPT-2, SmolLM2), SentencePiece
    byte fallback (``<0xF0>``) or plain text (``▁`` is a space)."""
    if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
        return bytes([int(token[3:5], 16)])
    if all(char in _BYTE_OF_CHAR for char in token):
        return bytes(_BYTE_OF_CHAR[char] for char in token)
    return token.replace("\u2581", " ").encode("utf-8")


def feature_token_ids(tokenizer: Any, feature: str) -> list[int]:
    """Ids of the tokens that start ``feature`` in a reply.

    emoji: tokens holding the lead bytes of a U+1Fxxx character (``F0 9F``: where nearly
    every emoji lives; byte-level tokenizers split most emoji there), ending in a lone
    four-byte lead byte (``F0``: an emoji split one byte earlier), or holding a whole emoji
    from another block (``emoji`` library, e.g. a merged ``✨``). exclamations: tokens with
    a ``!``.
    """
    check_rate_feature(feature)
    ids = []
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(range(len(tokenizer)))):
        if token is None or token_id in tokenizer.all_special_ids:
            continue
        raw = _token_bytes(token)
        if feature == "exclamations":
            hit = b"!" in raw
        else:
            text = raw.decode("utf-8", errors="ignore")
            hit = b"\xf0\x9f" in raw or raw.endswith(b"\xf0") or emoji.emoji_count(text) > 0
        if hit:
            ids.append(token_id)
    return ids


def log_feature_mass(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0
) -> torch.Tensor:
    """log P(next token in ``token_ids``) at each position of ``logits`` (..., vocab), under
    the sampling distribution (temperature, then nucleus, as transformers' ``generate``)."""
    shape = logits.shape[:-1]
    scores = logits.reshape(-1, logits.shape[-1]).float()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p, filter_value=OUTSIDE_NUCLEUS)(None, scores)
    log_probs = torch.log_softmax(scores, dim=-1)
    mass = torch.logsumexp(log_probs[:, token_ids], dim=-1)
    return mass.clamp(min=MIN_LOG_MASS).reshape(shape)


def up_to_first(tokens: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """1 at each position of ``tokens`` (..., T) up to and including the first one in
    ``token_ids``, 0 after it: the positions where the reply had not yet used the feature."""
    hit = torch.isin(tokens, token_ids).long()
    return ((hit.cumsum(-1) - hit) == 0).long()


@torch.inference_mode()
def expected_features(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    token_ids: Sequence[int],
    temperature: float,
    top_p: float,
    pad_token_id: int,
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Per reply, two Rao-Blackwellised estimates from its sampled prefixes, both
    unbiased when the completions were sampled from ``model`` at ``temperature`` /
    ``top_p`` (p_t = P(feature token | prefix_t), over the positions that drew a
    completion token, the stop token included):

    - count: sum_t p_t, for the expected number of feature tokens a reply;
    - present: sum of p_t up to the first sampled feature token (all positions if none),
      for the probability that a reply has the feature at all, since
      P(first feature token at t | prefix_t) = p_t while none came before.

    ``present`` is the low-variance one: counting replies with an emoji is one Bernoulli
    draw each (variance ~p), while its terms are the small per-position probabilities.

    Rows are laid out as ``generate`` lays them out (prompts left-padded, positions from
    the attention mask), and only the completion positions are projected to the
    vocabulary: the nucleus sort over 49k tokens is the cost.
    """
    ids = torch.tensor(list(token_ids))
    count, present = np.zeros(len(prompt_ids)), np.zeros(len(prompt_ids))
    for start in range(0, len(prompt_ids), batch_size):
        prompts = [list(p) for p in prompt_ids[start : start + batch_size]]
        completions = [list(c) for c in completion_ids[start : start + batch_size]]
        width_p, width_c = max(map(len, prompts)), max(map(len, completions))
        batch = torch.full((len(prompts), width_p + width_c), pad_token_id)
        mask = torch.zeros_like(batch)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            batch[i, width_p - len(p) : width_p + len(c)] = torch.tensor(p + c)
            mask[i, width_p - len(p) : width_p + len(c)] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=batch.to(model.device),
            attention_mask=mask.to(model.device),
            position_ids=positions.to(model.device),
            logits_to_keep=width_c + 1,
        ).logits[:, :-1]  # the positions that predict each completion token
        mass = log_feature_mass(logits.cpu(), ids, temperature, top_p).exp()
        drawn = mask[:, width_p:]
        rows = slice(start, start + len(prompts))
        count[rows] = (mass * drawn).sum(-1).numpy()
        present[rows] = (mass * drawn * up_to_first(batch[:, width_p:], ids)).sum(-1).numpy()
    return count, present


def anchor_loss(
    log_policy: torch.Tensor, log_ref: torch.Tensor, held: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The anchor's loss and its mean log ratio, over the positions where ``held`` is 1.

    Both are means weighted by the two models' mean feature mass at each position: the
    positions where either model would start the feature count, in both directions of
    drift; a position where neither would (mid-word) barely counts, whatever its ratio.
    """
    weight = held * (log_policy.detach().exp() + log_ref.exp()) / 2
    weight = weight / weight.sum().clamp(min=1e-12)
    log_ratio = log_policy - log_ref
    return (weight * log_ratio.square()).sum(), (weight * log_ratio.detach()).sum()


@dataclass(frozen=True)
class TokenAnchor:
    """Hold ``feature``'s token mass at the base model's for ``characters``' completions.

    ``coef`` weighs the anchor's loss (a weighted mean of squared log ratios: halving the
    mass everywhere costs 0.48 x coef) against GRPO's.
    """

    feature: str
    characters: Collection[str]
    coef: float = 1.0

    def __post_init__(self) -> None:
        check_rate_feature(self.feature)
        if self.coef <= 0:
            raise ValueError(f"anchor coef must be > 0, got {self.coef}; fix: e.g. 1.0")


def token_anchors(
    features: Sequence[str], checkers: Mapping[str, Sequence[Checker]], coef: float = 1.0
) -> list[TokenAnchor]:
    """One ``TokenAnchor`` per feature, over the characters allowed it: where a character
    forbids it (``no_emoji``), a falling mass is instruction following, not drift."""
    return [TokenAnchor(f, characters_allowing(f, checkers), coef) for f in features]


@dataclass(frozen=True)
class CreditMask:
    """No policy-gradient credit for the tokens that start ``feature`` in ``characters``'
    completions: their advantage is 0 there (TRL's per-token advantages); the KL term
    still holds them to the base model.

    GRPO credits every token of a reply with the reply's advantage. Where no reward
    observes whether a reply uses the feature, that credit is confounding, not evidence:
    a reward model trained on logged engagement can score a reply identically with its
    emoji removed (and the artifact penalty, the feature held, judges only how many), yet
    score emoji replies lower for their content. Then the few emoji sampled in a run,
    started by a handful of token ids that every emoji shares, are pushed down with bad
    content everywhere. With a token-estimated ``RateConstraint``, the mask is what holds
    the held-out emoji rate (benchmarks/README.md, ``grpo_steerability.py``). Where a
    character forbids the feature a checker does see it: ``credit_masks`` leaves those
    characters out.
    """

    feature: str
    characters: Collection[str]

    def __post_init__(self) -> None:
        check_rate_feature(self.feature)


def credit_masks(
    features: Sequence[str], checkers: Mapping[str, Sequence[Checker]]
) -> list[CreditMask]:
    """One ``CreditMask`` per feature, over the characters allowed it (no reward sees it)."""
    return [CreditMask(f, characters_allowing(f, checkers)) for f in features]


def uncredited(
    completion_ids: torch.Tensor, completion_mask: torch.Tensor, token_ids: torch.Tensor,
    held: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """True at the completion tokens in ``token_ids`` of the rows where ``held`` (B,) is 1:
    the positions a ``CreditMask`` gives no advantage."""
    hit = torch.isin(completion_ids, token_ids) & completion_mask.bool()
    return hit & held[:, None].bool()


class AnchoredGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer plus ``TokenAnchor`` losses, ``CreditMask`` s, and the
    ``expected_<feature>`` reward column of token-estimated ``RateConstraint`` s (none of
    them: GRPOTrainer as is).

    The reference is the base model as TRL's KL term sees it: the LoRA-disabled policy,
    or ``ref_model`` when training every weight (then ``beta`` must be > 0 for TRL to
    load one). Each anchor logs ``anchor/<feature>_log_ratio`` (the weighted mean log
    ratio: 0 is the base model's propensity, -0.69 half of it) and its loss; each
    ``CreditMask`` the number of tokens a step it took the advantage from
    (``credit_mask/<feature>_tokens``).
    """

    def __init__(
        self,
        *args: Any,
        anchors: Sequence[TokenAnchor] = (),
        credit_masks: Sequence[CreditMask] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.anchors = list(anchors)
        self.credit_masks = list(credit_masks)
        if self.anchors and self.ref_model is None and not hasattr(self.model, "peft_config"):
            raise ValueError(
                "token anchors need the base model's probabilities; fix: train LoRA "
                "(model_config(..., use_peft=True)) or set beta > 0 so TRL keeps a ref_model"
            )
        # RateConstraints that observe the policy's token probabilities (estimate="tokens").
        self.estimated = [f for f in self.reward_funcs if getattr(f, "estimate", None) == "tokens"]
        features = {a.feature for a in self.anchors} | {c.feature for c in self.estimated}
        features |= {m.feature for m in self.credit_masks}
        self._feature_ids = {
            f: torch.tensor(feature_token_ids(self.processing_class, f)) for f in features
        }

    def _calculate_rewards(
        self, inputs: list[dict[str, Any]], prompts: list[Any], completions: list[Any], ids: Any
    ) -> torch.Tensor:
        """TRL's rewards, after adding ``expected_<feature>`` to each input row: the policy's
        probability of the feature along that completion (``expected_features``), for the
        rows a token-estimated ``RateConstraint`` holds (0 elsewhere: it ignores them)."""
        if self.estimated:
            prompt_ids = self._tokenize_prompts(prompts)[0]
            model = self.accelerator.unwrap_model(self.model)
            for constraint in self.estimated:
                held = constraint.characters
                rows = [
                    i for i, row in enumerate(inputs) if held is None or row["character"] in held
                ]
                present = np.zeros(len(inputs))
                if rows:
                    present[rows] = expected_features(
                        model,
                        [prompt_ids[i] for i in rows],
                        [ids[i] for i in rows],
                        self._feature_ids[constraint.feature].tolist(),
                        self.temperature,
                        self.top_p,
                        self.processing_class.pad_token_id,
                    )[1]
                for row, x in zip(inputs, present, strict=True):
                    row[f"expected_{constraint.feature}"] = float(x)
        return super()._calculate_rewards(inputs, prompts, completions, ids)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        completions = output["completion_ids"]
        device = completions.device

        def held(characters: Collection[str]) -> torch.Tensor:
            return torch.tensor([float(row["character"] in characters) for row in inputs])

        for a in self.anchors:
            output[f"anchor_held_{a.feature}"] = held(a.characters).to(device)
        mode = "train" if self.model.training else "eval"
        for m in self.credit_masks:
            ids = self._feature_ids[m.feature].to(device)
            masked = uncredited(
                completions, output["completion_mask"], ids, held(m.characters).to(device)
            )
            advantages = output["advantages"]
            if advantages.dim() == 1:  # one per completion: TRL takes one per token too
                advantages = advantages[:, None].expand_as(completions)
            output["advantages"] = advantages.masked_fill(masked, 0.0)
            self._metrics[mode][f"credit_mask/{m.feature}_tokens"].append(float(masked.sum()))
        return output

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        held = [a for a in self.anchors if inputs[f"anchor_held_{a.feature}"].any()]
        if held:
            loss = loss + self._anchor_loss(model, inputs, held)
        return loss

    def _completion_logits(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """Logits at the positions that predict each completion token (batch, T, vocab)."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        keep = inputs["completion_ids"].size(1)
        logits = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=keep + 1).logits
        return logits[:, :-1]

    def _anchor_loss(
        self, model: Any, inputs: dict[str, Any], anchors: Sequence[TokenAnchor]
    ) -> torch.Tensor:
        # Only the completions some anchor holds pay for the two extra forward passes.
        rows = torch.stack([inputs[f"anchor_held_{a.feature}"] for a in anchors]).amax(0) > 0
        keys = [*SEQUENCE_KEYS, *(f"anchor_held_{a.feature}" for a in anchors)]
        inputs = {key: inputs[key][rows] for key in keys}
        policy_logits = self._completion_logits(model, inputs)
        with torch.no_grad():
            if self.ref_model is not None:
                ref_logits = self._completion_logits(self.ref_model, inputs)
            else:
                unwrapped = self.accelerator.unwrap_model(self.model)
                ref = "ref" if "ref" in unwrapped.peft_config else None
                with use_adapter(unwrapped, adapter_name=ref):
                    ref_logits = self._completion_logits(model, inputs)
        mode = "train" if self.model.training else "eval"
        total = policy_logits.new_zeros(())
        for a in anchors:
            ids = self._feature_ids[a.feature].to(policy_logits.device)
            # The whole distribution, not the sampling nucleus: where the policy's nucleus
            # drops every emoji token its mass is a floor without a gradient, and those are
            # the positions the anchor is for (at top_p 0.95 the anchor cannot pull such
            # a position's log ratio back).
            log_policy = log_feature_mass(policy_logits, ids, self.temperature)
            log_ref = log_feature_mass(ref_logits, ids, self.temperature)
            held = inputs[f"anchor_held_{a.feature}"][:, None] * inputs["completion_mask"]
            # Up to the first sampled feature token: how readily the policy starts one, not
            # how it goes on (a reply of emoji has mass near 1 after its first, which would
            # outweigh every position where the choice is made).
            held = held * up_to_first(inputs["completion_ids"], ids)
            loss, log_ratio = anchor_loss(log_policy, log_ref, held)
            self._metrics[mode][f"anchor/{a.feature}_log_ratio"].append(float(log_ratio))
            self._metrics[mode][f"anchor/{a.feature}_loss"].append(float(loss.detach()))
            total = total + a.coef * loss
        # TRL scales the policy loss for gradient accumulation itself; match it.
        if mode == "train":
            total = total / self.current_gradient_accumulation_steps
        return total
