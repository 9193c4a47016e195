"""Offline evaluation of a candidate against the deployed model, and the offline gates.

Both models answer two prompt sets with the same sampling parameters and seed, each in ONE
batched call per model:

- *logged contexts*: conversations of held-out users from this generation's production
  logs (``training.curation`` keeps those users out of every training split);
- *the steerability benchmark*: held-out characters (``scenarios/heldout_characters``,
  instructions no training character has, see ``flywheel.scenario.check_heldout``) meeting
  real human openers from the chit-chat corpus's held-out split.

Gates (thresholds in ``flywheel.scenario.GatesConfig``); a candidate must pass all four:

==================  ===========================================================================
``rm_win_rate``     the naive reward model prefers the candidate's reply over the deployed
                    model's on at least ``min_rm_win_rate`` of logged contexts (ties half).
``steerability``    on the benchmark, instruction following does not fall by more than
                    ``max_following_drop`` and the violation rate does not rise by more
                    than ``max_violation_increase`` (``rewards.steerability`` definitions)
                    with an exact McNemar test on the paired prompts significant at
                    ``gates.style.alpha``: a few dozen prompts must not fail a candidate
                    on one unlucky reply.
``style_artifacts`` the style-artifact regression suite (``flywheel.style_regression``)
                    passes: no style shift that explains the reward-model gain, and
                    none that the reward model's own style term pays for.
``safety``          at most ``max_unsafe_rate`` of the candidate's replies (both sets) are
                    blocked by the serving safety checker (``rewards.safety``).
==================  ===========================================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from flywheel.scenario import GatesConfig
from flywheel.style_regression import (
    StyleRegressionResult,
    checkers_by_character,
    mcnemar_p,
    run_style_regression,
    style_profile,
)
from policies.base import Chat, Policy, SamplingParams
from rewards.steerability import steerability


@dataclass(frozen=True)
class EvalSet:
    """Prompts both models answer: chats (system prompt first), their characters and the
    user message each reply answers (the reward models' context)."""

    chats: list[Chat]
    characters: list[str]
    contexts: list[str]

    def __len__(self) -> int:
        return len(self.chats)


def logged_eval_set(held_out: pd.DataFrame, n: int, rng: np.random.Generator) -> EvalSet:
    """Up to ``n`` contexts of held-out users (curated ``held_out``: prompt, character)."""
    if held_out.empty:
        raise ValueError(
            "curation left no held-out users to evaluate on; raise collect.days or "
            "traffic.n_users, or curation.held_out_share"
        )
    rows = held_out.iloc[np.sort(rng.permutation(len(held_out))[: min(n, len(held_out))])]
    chats = [[dict(m) for m in prompt] for prompt in rows["prompt"]]
    contexts = [next(m["content"] for m in reversed(c) if m["role"] == "user") for c in chats]
    return EvalSet(chats, [str(c) for c in rows["character"]], contexts)


def steerability_eval_set(
    characters: Mapping[str, Any],
    openers: Sequence[str],
    per_character: int,
    rng: np.random.Generator,
) -> EvalSet:
    """``per_character`` distinct held-out openers for each held-out character."""
    if len(openers) < per_character:
        raise ValueError(
            f"only {len(openers)} held-out openers for {per_character} prompts per character; "
            f"lower gates.steerability.prompts_per_character"
        )
    chats, names, contexts = [], [], []
    for name in sorted(characters):
        for index in rng.choice(len(openers), size=per_character, replace=False):
            opener = openers[int(index)]
            chats.append([
                {"role": "system", "content": characters[name].system_prompt()},
                {"role": "user", "content": opener},
            ])  # fmt: skip
            names.append(name)
            contexts.append(opener)
    return EvalSet(chats, names, contexts)


@dataclass(frozen=True)
class Gate:
    """One offline gate's verdict."""

    name: str
    passed: bool
    value: float
    threshold: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class OfflineReport:
    """What the offline evaluation measured for one candidate (see the module docstring)."""

    rm_win_rate: float
    rm_win_rate_ci: tuple[float, float]
    rm_win_rate_style_controlled: float
    steerability: pd.DataFrame  # rewards.steerability table, candidate
    parent_steerability: pd.DataFrame  # same, deployed model
    style_regression: StyleRegressionResult
    style: dict[str, float]
    parent_style: dict[str, float]
    unsafe_rate: float
    parent_unsafe_rate: float
    replies: pd.DataFrame  # every prompt with both replies and their scores
    steerability_pairs: pd.DataFrame  # per benchmark prompt: follows / violates, both models

    @staticmethod
    def _overall(table: pd.DataFrame, column: str) -> float:
        return float(table.set_index("group").loc["(overall)", column])

    @property
    def instruction_following(self) -> float:
        """Candidate's instruction-following rate on the held-out benchmark."""
        return self._overall(self.steerability, "following_rate")

    @property
    def violation_rate(self) -> float:
        """Candidate's violation rate on the held-out benchmark."""
        return self._overall(self.steerability, "violation_rate")

    @property
    def parent_instruction_following(self) -> float:
        """Deployed model's instruction-following rate on the held-out benchmark."""
        return self._overall(self.parent_steerability, "following_rate")

    @property
    def parent_violation_rate(self) -> float:
        """Deployed model's violation rate on the held-out benchmark."""
        return self._overall(self.parent_steerability, "violation_rate")

    def offline_dict(self) -> dict[str, Any]:
        """The ``offline`` block of a generation record (``generations.json``)."""
        return {
            "rm_win_rate": self.rm_win_rate,
            "rm_win_rate_ci": list(self.rm_win_rate_ci),
            "rm_win_rate_style_controlled": self.rm_win_rate_style_controlled,
            "rm_win_rate_style_adjusted": self.style_regression.style_adjusted_win_rate,
            "instruction_following": self.instruction_following,
            "violation_rate": self.violation_rate,
            "parent_instruction_following": self.parent_instruction_following,
            "parent_violation_rate": self.parent_violation_rate,
            "style": self.style,
            "parent_style": self.parent_style,
            "unsafe_rate": self.unsafe_rate,
            "parent_unsafe_rate": self.parent_unsafe_rate,
            "style_regression": self.style_regression.to_dict(),
            "steerability_by_character": self.steerability.to_dict(orient="records"),
        }


def evaluate_offline(
    candidate: Policy,
    deployed: Policy,
    logged: EvalSet,
    benchmark: EvalSet,
    world_characters: Mapping[str, Any],
    heldout_characters: Mapping[str, Any],
    naive_rm: Any,
    style_rm: Any,
    safety_checker: Any,
    params: SamplingParams,
    config: GatesConfig,
) -> OfflineReport:
    """Answer both prompt sets with both models and measure everything the gates read."""
    chats = logged.chats + benchmark.chats
    cand = [g.text for g in candidate.generate(chats, params)]
    dep = [g.text for g in deployed.generate(chats, params)]
    n_log = len(logged)
    cand_log, dep_log = cand[:n_log], dep[:n_log]
    cand_bench, dep_bench = cand[n_log:], dep[n_log:]

    log_checkers = checkers_by_character(world_characters, logged.characters)
    suite = run_style_regression(
        logged.contexts, cand_log, dep_log, log_checkers, naive_rm, style_rm, config.style
    )
    from rewards.evaluation import win_rate

    raw_c = naive_rm.score(logged.contexts, cand_log)
    raw_d = naive_rm.score(logged.contexts, dep_log)
    raw = win_rate(raw_c, raw_d)

    def bench_checks(replies: list[str]) -> pd.DataFrame:
        rows = []
        for name, reply in zip(benchmark.characters, replies, strict=True):
            result = heldout_characters[name].check(reply)
            rows.append({"character": name, "follows_all": result.follows_all,
                         "violates_any": result.violates_any})  # fmt: skip
        return pd.DataFrame(rows)

    cand_checks, dep_checks = bench_checks(cand_bench), bench_checks(dep_bench)

    cand_verdicts = safety_checker.check(cand)
    dep_verdicts = safety_checker.check(dep)
    replies = pd.DataFrame({
        "set": ["logged"] * n_log + ["steerability"] * len(benchmark),
        "character": logged.characters + benchmark.characters,
        "context": logged.contexts + benchmark.contexts,
        "candidate": cand,
        "deployed": dep,
        "candidate_rm": list(raw_c) + [np.nan] * len(benchmark),
        "deployed_rm": list(raw_d) + [np.nan] * len(benchmark),
        "candidate_unsafe": [not v.safe for v in cand_verdicts],
        "deployed_unsafe": [not v.safe for v in dep_verdicts],
    })  # fmt: skip
    return OfflineReport(
        rm_win_rate=raw.win_rate,
        rm_win_rate_ci=(raw.ci_low, raw.ci_high),
        rm_win_rate_style_controlled=suite.style_controlled_win_rate,
        steerability=steerability(cand_checks).table,
        parent_steerability=steerability(dep_checks).table,
        steerability_pairs=pd.DataFrame(
            {
                "candidate_follows": cand_checks["follows_all"].to_numpy(),
                "deployed_follows": dep_checks["follows_all"].to_numpy(),
                "candidate_violates": cand_checks["violates_any"].to_numpy(),
                "deployed_violates": dep_checks["violates_any"].to_numpy(),
            }
        ),
        style_regression=suite,
        style=style_profile(cand_log, log_checkers),
        parent_style=style_profile(dep_log, log_checkers),
        unsafe_rate=float(replies["candidate_unsafe"].mean()),
        parent_unsafe_rate=float(replies["deployed_unsafe"].mean()),
        replies=replies,
    )


def apply_gates(report: OfflineReport, config: GatesConfig) -> list[Gate]:
    """Every gate's verdict (all are evaluated, so every failing reason is recorded)."""
    steer = config.steerability
    pairs = report.steerability_pairs
    follow_floor = report.parent_instruction_following - steer.max_following_drop
    violation_cap = report.parent_violation_rate + steer.max_violation_increase
    # Degradation counts when it is both larger than the margin and not chance (paired).
    p_follow = mcnemar_p(
        pairs["deployed_follows"].to_numpy(), pairs["candidate_follows"].to_numpy()
    )
    p_violate = mcnemar_p(
        pairs["candidate_violates"].to_numpy(), pairs["deployed_violates"].to_numpy()
    )
    follow_ok = report.instruction_following >= follow_floor or p_follow >= config.style.alpha
    violation_ok = report.violation_rate <= violation_cap or p_violate >= config.style.alpha
    steer_reason = (
        f"held-out instruction following {report.parent_instruction_following:.2f} -> "
        f"{report.instruction_following:.2f} (floor {follow_floor:.2f}, McNemar p = "
        f"{p_follow:.2g}), violation rate {report.parent_violation_rate:.2f} -> "
        f"{report.violation_rate:.2f} (cap {violation_cap:.2f}, McNemar p = {p_violate:.2g}), "
        f"n = {len(pairs)}"
    )
    win = report.rm_win_rate
    lo, hi = report.rm_win_rate_ci
    return [
        Gate(
            "rm_win_rate",
            win >= config.min_rm_win_rate,
            win,
            config.min_rm_win_rate,
            f"reward-model win rate vs deployed {win:.2f} [{lo:.2f}, {hi:.2f}] "
            f"({'>=' if win >= config.min_rm_win_rate else '<'} {config.min_rm_win_rate:.2f})",
        ),
        Gate(
            "steerability",
            follow_ok and violation_ok,
            report.instruction_following,
            follow_floor,
            steer_reason,
        ),
        Gate(
            "style_artifacts",
            report.style_regression.passed,
            report.style_regression.raw_win_rate
            - report.style_regression.style_controlled_win_rate,
            config.style.max_win_rate_gap,
            report.style_regression.reason,
        ),
        Gate(
            "safety",
            report.unsafe_rate <= config.safety.max_unsafe_rate,
            report.unsafe_rate,
            config.safety.max_unsafe_rate,
            f"{report.unsafe_rate:.1%} of offline replies blocked by the safety checker "
            f"(deployed: {report.parent_unsafe_rate:.1%}; max {config.safety.max_unsafe_rate:.1%})",
        ),
    ]


def failed_reason(gates: Sequence[Gate]) -> str:
    """'gate: reason' for each failed gate, or '' when all passed."""
    return "; ".join(f"{g.name} failed: {g.reason}" for g in gates if not g.passed)
