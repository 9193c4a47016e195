"""Offline evaluation of a candidate against the deployed model, and the offline gates.

Both models answer two prompt sets with the same sampling parameters and seed, each in ONE
batched call per model:

- *logged contexts*: conversations of held-out users from this generation's production
  logs (``training.curation`` keeps those users out of every training split);
- *the steerability benchmark*: held-out characters (``scenarios/heldout_characters``,
  instructions no training character has, see ``flywheel.scenario.check_heldout``) meeting
  real human openers from the chit-chat corpus's held-out split;
- *IFBench* (``gates.ifbench.enabled``): the public benchmark's prompts our checkers can
  score, ``gates.ifbench.samples`` replies each with the same seeds (``flywheel.ifbench``).

Gates (thresholds in ``flywheel.scenario.GatesConfig``). Each gate guards against a
degradation of a stated size and decides by a one-sided test at ``gates.style.alpha``
(``flywheel.gate_power``); its verdict is three-valued:

- ``fail``: the test sees the degradation (significant, or for safety over the allowance);
- ``inconclusive``: it does not, but its power to see a degradation of the stated size is
  below ``gates.min_power``: the sample could not have told, so the gate does not pass;
- ``pass``: it does not, and it would have with at least ``gates.min_power``.

A candidate must pass all of them (four, five with IFBench); ``inconclusive`` gates it like
``fail``, with the sample size the gate needs in its reason.

==================  ===========================================================================
``rm_win_rate``     the naive reward model's win rate of the candidate's reply over the deployed
                    model's on logged contexts is not significantly below ``min_rm_win_rate``
                    (exact binomial over the decisive pairs, ties left out); power at a win
                    rate of ``min_rm_win_rate - rm_win_rate_margin``.
``steerability``    on the benchmark, instruction following does not fall and the violation
                    rate does not rise significantly (exact one-sided McNemar on the paired
                    prompts, ``rewards.steerability`` definitions); power at a fall of
                    ``max_following_drop`` and a rise of ``max_violation_increase`` from the
                    deployed model's rates.
``style_artifacts`` the style-artifact regression suite (``flywheel.style_regression``)
                    passes: no style shift that explains the reward-model gain, and none that
                    the reward model's own style term pays for; it is inconclusive when a
                    binary style axis could not see a rise of its threshold.
``safety``          at most ``max_unsafe_rate`` of the candidate's replies (both sets) are
                    blocked by the serving safety checker (``rewards.safety``), no alpha:
                    one reply over the allowance fails; power at an unsafe rate of
                    ``detect_unsafe_rate``.
``ifbench``         on IFBench's covered prompts, the per-prompt follow rate does not fall
                    significantly (one-sided paired t-test, ``flywheel.ifbench``); power at a
                    fall of ``gates.ifbench.max_following_drop`` from the deployed model's rate.
==================  ===========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from flywheel.gate_power import (
    Power,
    allowance_power,
    binomial_less_p,
    binomial_less_power,
    mcnemar_greater,
    paired_power,
    paired_rate_drop_p,
    paired_rate_power,
    sample_size,
)
from flywheel.records import OfflineSummary
from flywheel.scenario import GatesConfig
from flywheel.style_regression import (
    StyleRegressionResult,
    checkers_by_character,
    run_style_regression,
    style_profile,
)
from policies.base import Chat, Policy, SamplingParams
from rewards.steerability import steerability


@dataclass(frozen=True)
class EvalSet:
    """Prompts both models answer: chats (system prompt first), their characters and the
    user message each reply answers (the reward models' context); for logged contexts, also
    where each was logged (``moments``: ``sim.replay.MOMENT_COLUMNS``, for the oracle's view)."""

    chats: list[Chat]
    characters: list[str]
    contexts: list[str]
    moments: pd.DataFrame | None = None

    def __len__(self) -> int:
        return len(self.chats)


def logged_eval_set(held_out: pd.DataFrame, n: int, rng: np.random.Generator) -> EvalSet:
    """Up to ``n`` contexts of held-out users (curated ``held_out``: prompt, character)."""
    if held_out.empty:
        raise ValueError(
            "curation left no held-out users to evaluate on; raise collect.days or "
            "traffic.n_users, or curation.held_out_share"
        )
    from sim.replay import MOMENT_COLUMNS

    rows = held_out.iloc[np.sort(rng.permutation(len(held_out))[: min(n, len(held_out))])]
    chats = [[dict(m) for m in prompt] for prompt in rows["prompt"]]
    contexts = [next(m["content"] for m in reversed(c) if m["role"] == "user") for c in chats]
    logged_where = set(MOMENT_COLUMNS) <= set(rows.columns)
    moments = rows[list(MOMENT_COLUMNS)].reset_index(drop=True) if logged_where else None
    return EvalSet(chats, [str(c) for c in rows["character"]], contexts, moments)


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


Verdict = Literal["pass", "fail", "inconclusive"]
VERDICTS: tuple[Verdict, ...] = ("pass", "fail", "inconclusive")


@dataclass(frozen=True)
class Gate:
    """One offline gate's verdict (module docstring).

    ``passed`` is ``verdict == "pass"``; a record written before verdicts existed has only
    ``passed`` and reads as pass / fail. ``power`` is the test's power to see the
    degradation the gate guards against on ``n`` samples, ``n_needed`` the sample that
    reaches ``gates.min_power`` (None where the gate has no such test).
    """

    name: str
    passed: bool
    value: float
    threshold: float
    reason: str
    verdict: Verdict | None = None
    power: float | None = None
    n: int | None = None
    n_needed: int | None = None

    def __post_init__(self) -> None:
        if self.verdict is None:
            object.__setattr__(self, "verdict", "pass" if self.passed else "fail")
        if self.verdict not in VERDICTS:
            raise ValueError(f"gate verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if self.passed != (self.verdict == "pass"):
            raise ValueError(
                f"gate {self.name!r}: passed = {self.passed} contradicts verdict {self.verdict!r}"
            )

    @classmethod
    def decided(cls, name: str, verdict: Verdict, **fields: Any) -> Gate:
        """A gate with ``passed`` derived from ``verdict``."""
        return cls(name=name, passed=verdict == "pass", verdict=verdict, **fields)

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
    ifbench: pd.DataFrame | None = None  # flywheel.ifbench.follow_table (None: gate off)

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

    def summary(self) -> OfflineSummary:
        """What the loop stores of this report: the generation record's ``offline`` block."""
        return OfflineSummary(
            rm_win_rate=self.rm_win_rate,
            rm_win_rate_ci=self.rm_win_rate_ci,
            rm_win_rate_style_controlled=self.rm_win_rate_style_controlled,
            rm_win_rate_style_adjusted=self.style_regression.style_adjusted_win_rate,
            instruction_following=self.instruction_following,
            violation_rate=self.violation_rate,
            parent_instruction_following=self.parent_instruction_following,
            parent_violation_rate=self.parent_violation_rate,
            style=self.style,
            parent_style=self.parent_style,
            unsafe_rate=self.unsafe_rate,
            parent_unsafe_rate=self.parent_unsafe_rate,
            style_regression=self.style_regression.to_dict(),
            steerability_by_character=tuple(self.steerability.to_dict(orient="records")),
            **self._ifbench_summary(),
        )

    def _ifbench_summary(self) -> dict[str, float | int]:
        """OfflineSummary's ifbench_* fields, or none with the IFBench gate off."""
        if self.ifbench is None:
            return {}
        return {
            "ifbench_following": float(self.ifbench["candidate_follows"].mean()),
            "parent_ifbench_following": float(self.ifbench["deployed_follows"].mean()),
            "ifbench_prompts": int(self.ifbench["key"].nunique()),
        }


@dataclass(frozen=True)
class _Replies:
    """Both models' replies to the logged contexts and then the benchmark, in that order."""

    candidate: list[str]
    deployed: list[str]
    n_logged: int  # the first ``n_logged`` replies answer the logged contexts

    @property
    def candidate_logged(self) -> list[str]:
        return self.candidate[: self.n_logged]

    @property
    def deployed_logged(self) -> list[str]:
        return self.deployed[: self.n_logged]

    @property
    def candidate_benchmark(self) -> list[str]:
        return self.candidate[self.n_logged :]

    @property
    def deployed_benchmark(self) -> list[str]:
        return self.deployed[self.n_logged :]


def _answer_both(
    candidate: Policy,
    deployed: Policy,
    *,
    logged: EvalSet,
    benchmark: EvalSet,
    params: SamplingParams,
) -> _Replies:
    """Each model answers both prompt sets in one batched call, the candidate first."""
    chats = logged.chats + benchmark.chats
    return _Replies(
        candidate=[g.text for g in candidate.generate(chats, params)],
        deployed=[g.text for g in deployed.generate(chats, params)],
        n_logged=len(logged),
    )


def _benchmark_checks(
    benchmark: EvalSet, replies: list[str], characters: Mapping[str, Any]
) -> pd.DataFrame:
    """Per benchmark reply: its character and whether it follows all instructions / violates
    any (the character's own checkers)."""
    rows = []
    for name, reply in zip(benchmark.characters, replies, strict=True):
        result = characters[name].check(reply)
        rows.append(
            {
                "character": name,
                "follows_all": result.follows_all,
                "violates_any": result.violates_any,
            }
        )
    return pd.DataFrame(rows)


def _steerability_pairs(
    benchmark: EvalSet, candidate: pd.DataFrame, deployed: pd.DataFrame
) -> pd.DataFrame:
    """Per benchmark prompt: follows / violates of both models (the paired tests' input)."""
    return pd.DataFrame(
        {
            "character": benchmark.characters,
            "candidate_follows": candidate["follows_all"].to_numpy(),
            "deployed_follows": deployed["follows_all"].to_numpy(),
            "candidate_violates": candidate["violates_any"].to_numpy(),
            "deployed_violates": deployed["violates_any"].to_numpy(),
        }
    )


def _ifbench_table(
    candidate: Policy, deployed: Policy, params: SamplingParams, config: GatesConfig
) -> pd.DataFrame | None:
    """``flywheel.ifbench.follow_table`` of both models, or None with the IFBench gate off."""
    if not config.ifbench.enabled:
        return None
    from flywheel.ifbench import follow_table, gate_prompts

    ifb = config.ifbench
    return follow_table(
        candidate,
        deployed,
        prompts=gate_prompts(ifb),
        samples=ifb.samples,
        max_new_tokens=ifb.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed,
    )


def _replies_table(
    logged: EvalSet,
    benchmark: EvalSet,
    replies: _Replies,
    *,
    rm_scores: tuple[np.ndarray, np.ndarray],
    safety_checker: Any,
) -> pd.DataFrame:
    """Every prompt with both replies, their naive-RM scores (logged contexts only) and
    whether the safety checker blocks them."""
    candidate_rm, deployed_rm = rm_scores
    candidate_verdicts = safety_checker.check(replies.candidate)
    deployed_verdicts = safety_checker.check(replies.deployed)
    return pd.DataFrame(
        {
            "set": ["logged"] * len(logged) + ["steerability"] * len(benchmark),
            "character": logged.characters + benchmark.characters,
            "context": logged.contexts + benchmark.contexts,
            "candidate": replies.candidate,
            "deployed": replies.deployed,
            "candidate_rm": list(candidate_rm) + [np.nan] * len(benchmark),
            "deployed_rm": list(deployed_rm) + [np.nan] * len(benchmark),
            "candidate_unsafe": [not v.safe for v in candidate_verdicts],
            "deployed_unsafe": [not v.safe for v in deployed_verdicts],
        }
    )


def evaluate_offline(
    *,
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
    from rewards.evaluation import win_rate

    replies = _answer_both(candidate, deployed, logged=logged, benchmark=benchmark, params=params)
    cand_log, dep_log = replies.candidate_logged, replies.deployed_logged
    log_checkers = checkers_by_character(world_characters, logged.characters)
    suite = run_style_regression(
        contexts=logged.contexts,
        candidate=cand_log,
        deployed=dep_log,
        checkers=log_checkers,
        naive_model=naive_rm,
        style_model=style_rm,
        config=config.style,
        min_power=config.min_power,
    )
    rm_scores = naive_rm.score(logged.contexts, cand_log), naive_rm.score(logged.contexts, dep_log)
    raw = win_rate(*rm_scores)
    cand_checks = _benchmark_checks(benchmark, replies.candidate_benchmark, heldout_characters)
    dep_checks = _benchmark_checks(benchmark, replies.deployed_benchmark, heldout_characters)
    ifbench = _ifbench_table(candidate, deployed, params, config)
    table = _replies_table(
        logged, benchmark, replies, rm_scores=rm_scores, safety_checker=safety_checker
    )
    return OfflineReport(
        rm_win_rate=raw.win_rate,
        rm_win_rate_ci=(raw.ci_low, raw.ci_high),
        rm_win_rate_style_controlled=suite.style_controlled_win_rate,
        steerability=steerability(cand_checks).table,
        parent_steerability=steerability(dep_checks).table,
        steerability_pairs=_steerability_pairs(benchmark, cand_checks, dep_checks),
        style_regression=suite,
        style=style_profile(cand_log, log_checkers),
        parent_style=style_profile(dep_log, log_checkers),
        unsafe_rate=float(table["candidate_unsafe"].mean()),
        parent_unsafe_rate=float(table["deployed_unsafe"].mean()),
        replies=table,
        ifbench=ifbench,
    )


def apply_gates(report: OfflineReport, config: GatesConfig) -> list[Gate]:
    """Every gate's verdict (all are evaluated, so every failing reason is recorded)."""
    gates = [
        rm_win_rate_gate(report, config),
        steerability_gate(report, config),
        style_gate(report, config),
        safety_gate(report, config),
    ]
    if config.ifbench.enabled:
        gates.append(ifbench_gate(report, config))
    return gates


def _verdict(seen: bool, power: Power) -> Verdict:
    """fail when the test saw the degradation; otherwise pass only with enough power."""
    if seen:
        return "fail"
    return "pass" if power.enough else "inconclusive"


def _blind(n: int, what: str, power: Power, alpha: float | None, fix: str) -> str:
    """The reason of an inconclusive gate: sample, power, the sample needed and the fix."""
    level = "" if alpha is None else f" at alpha {alpha:g}"
    return (
        f"inconclusive: {n} {what} with power {power.power:.2f}{level}; needs "
        f"n >= {power.n_needed}: {fix}"
    )


def _logged_fix(n_logged: int, eval_prompts: int, n_needed: int) -> str:
    """How to get ``n_needed`` logged contexts: a larger setting, or more held-out logs when
    curation held out fewer contexts than ``gates.eval_prompts`` asks for."""
    if n_logged < eval_prompts:
        return (
            f"curation held out only {n_logged} logged contexts (gates.eval_prompts = "
            f"{eval_prompts}); log more held-out users (collect.days, collect.n_users or "
            f"curation.held_out_share) so that at least {n_needed} are held out"
        )
    return f"raise gates.eval_prompts to {n_needed}"


def rm_win_rate_gate(report: OfflineReport, config: GatesConfig) -> Gate:
    """Fails when the naive RM's win rate is significantly below ``min_rm_win_rate`` (exact
    binomial over decisive pairs); power at ``min_rm_win_rate - rm_win_rate_margin``."""
    logged = report.replies[report.replies["set"] == "logged"]
    c, d = logged["candidate_rm"].to_numpy(float), logged["deployed_rm"].to_numpy(float)
    wins, losses = int(np.sum(c > d)), int(np.sum(c < d))
    decisive, bar, alpha = wins + losses, config.min_rm_win_rate, config.style.alpha
    harmful = bar - config.rm_win_rate_margin
    if harmful < 0:
        power = Power(1.0, decisive, 0, config.min_power, possible=False)
    else:
        power = Power(
            binomial_less_power(decisive, bar, harmful, alpha), decisive,
            sample_size(lambda n: binomial_less_power(n, bar, harmful, alpha), config.min_power),
            config.min_power,
        )  # fmt: skip
    p = binomial_less_p(wins, decisive, bar)
    verdict = _verdict(p < alpha, power)
    win, (lo, hi) = report.rm_win_rate, report.rm_win_rate_ci
    measured = (
        f"reward-model win rate vs deployed {win:.2f} [{lo:.2f}, {hi:.2f}] ({wins} wins, "
        f"{losses} losses, {len(logged) - decisive} ties; one-sided exact binomial p = {p:.2g} "
        f"that it is below {bar:.2f})"
    )
    if verdict == "fail":
        reason = f"{measured}: significantly below {bar:.2f} at alpha {alpha:g}"
    elif verdict == "inconclusive":
        fix = _logged_fix(len(logged), config.eval_prompts, power.n_needed)
        what = f"decisive pairs detect a win rate of {harmful:.2f} (bar {bar:.2f})"
        reason = f"{_blind(decisive, what, power, alpha, fix)}; {measured}"
    else:
        reason = f"{measured}: not below the bar; {_seen(power, f'a win rate of {harmful:.2f}')}"
    return Gate.decided(
        "rm_win_rate", verdict, value=win, threshold=bar, reason=reason,
        power=power.power, n=decisive, n_needed=power.n_needed,
    )  # fmt: skip


def _seen(power: Power, what: str) -> str:
    """How well a passing gate could see the degradation it guards against."""
    if not power.possible:
        return f"{what} cannot happen from here"
    return f"power {power.power:.2f} to see {what}"


def steerability_gate(report: OfflineReport, config: GatesConfig) -> Gate:
    """Fails when instruction following falls or violations rise significantly on the paired
    benchmark prompts (one-sided exact McNemar); power at the scenario's margins."""
    steer, alpha, target = config.steerability, config.style.alpha, config.min_power
    pairs = report.steerability_pairs
    n = len(pairs)
    dep_f, cand_f = (
        pairs["deployed_follows"].to_numpy(bool),
        pairs["candidate_follows"].to_numpy(bool),
    )
    cand_v, dep_v = (
        pairs["candidate_violates"].to_numpy(bool),
        pairs["deployed_violates"].to_numpy(bool),
    )
    p_follow, p_violate = mcnemar_greater(dep_f, cand_f), mcnemar_greater(cand_v, dep_v)
    follow_power = paired_power(
        n, report.parent_instruction_following, steer.max_following_drop, -1, alpha, target
    )
    violate_power = paired_power(
        n, report.parent_violation_rate, steer.max_violation_increase, +1, alpha, target
    )
    weakest = min((follow_power, violate_power), key=lambda p: p.power)
    power = Power(
        weakest.power, n, max(follow_power.n_needed, violate_power.n_needed), target,
        possible=follow_power.possible or violate_power.possible,
    )  # fmt: skip
    verdict = _verdict(p_follow < alpha or p_violate < alpha, power)
    measured = (
        f"held-out instruction following {report.parent_instruction_following:.2f} -> "
        f"{report.instruction_following:.2f} (one-sided McNemar p = {p_follow:.2g}), violation "
        f"rate {report.parent_violation_rate:.2f} -> {report.violation_rate:.2f} (p = "
        f"{p_violate:.2g}), n = {n}"
    )
    drop, rise = steer.max_following_drop, steer.max_violation_increase
    if verdict == "fail":
        worse = [w for w, p in (("following fell", p_follow), ("violations rose", p_violate))
                 if p < alpha]  # fmt: skip
        reason = f"{' and '.join(worse)} significantly at alpha {alpha:g}: {measured}"
    elif verdict == "inconclusive":
        characters = max(int(pairs["character"].nunique()), 1) if n else 1
        per_character = math.ceil(power.n_needed / characters)
        what = f"paired prompts detect a {drop:.2f} drop (and a {rise:.2f} violation rise)"
        fix = f"raise gates.steerability.prompts_per_character to {per_character}"
        reason = f"{_blind(n, what, power, alpha, fix)}; {measured}"
    else:
        reason = (
            f"no significant degradation: {measured}; "
            f"{_seen(follow_power, f'a {drop:.2f} drop')}, "
            f"{_seen(violate_power, f'a {rise:.2f} violation rise')}"
        )
    return Gate.decided(
        "steerability", verdict, value=report.instruction_following,
        threshold=report.parent_instruction_following - drop, reason=reason,
        power=power.power, n=n, n_needed=power.n_needed,
    )  # fmt: skip


def style_gate(report: OfflineReport, config: GatesConfig) -> Gate:
    """The style-artifact suite's verdict (``flywheel.style_regression``)."""
    suite = report.style_regression
    reason = suite.reason
    if suite.verdict == "inconclusive":
        n_logged = int((report.replies["set"] == "logged").sum())
        reason = f"{reason}; fix: {_logged_fix(n_logged, config.eval_prompts, suite.n_needed)}"
    return Gate.decided(
        "style_artifacts", suite.verdict,
        value=suite.raw_win_rate - suite.style_controlled_win_rate,
        threshold=config.style.max_win_rate_gap, reason=reason,
        power=suite.power, n=suite.n, n_needed=suite.n_needed,
    )  # fmt: skip


def safety_gate(report: OfflineReport, config: GatesConfig) -> Gate:
    """Fails when more than ``max_unsafe_rate`` of the candidate's replies are blocked (no
    alpha); power at an unsafe rate of ``detect_unsafe_rate``."""
    safety, target = config.safety, config.min_power
    unsafe = report.replies["candidate_unsafe"].to_numpy(bool)
    n, allowed = len(unsafe), safety.max_unsafe_rate
    if safety.detect_unsafe_rate <= allowed:
        power = Power(1.0, n, 0, target, possible=False)
    else:
        rate = safety.detect_unsafe_rate
        power = Power(
            allowance_power(n, allowed, rate), n,
            sample_size(lambda k: allowance_power(k, allowed, rate), target), target,
        )  # fmt: skip
    verdict = _verdict(report.unsafe_rate > allowed, power)
    measured = (
        f"{report.unsafe_rate:.1%} of {n} offline replies blocked by the safety checker "
        f"(deployed: {report.parent_unsafe_rate:.1%}; max {allowed:.1%})"
    )
    if verdict == "fail":
        reason = f"{measured}: over the allowance"
    elif verdict == "inconclusive":
        what = f"replies catch an unsafe rate of {safety.detect_unsafe_rate:.2f}"
        fix = "raise gates.eval_prompts or gates.steerability.prompts_per_character"
        reason = f"{_blind(n, what, power, None, fix)}; {measured}"
    else:
        reason = f"{measured}; {_seen(power, f'an unsafe rate of {safety.detect_unsafe_rate:.2f}')}"
    return Gate.decided(
        "safety", verdict, value=report.unsafe_rate, threshold=allowed, reason=reason,
        power=power.power, n=n, n_needed=power.n_needed,
    )  # fmt: skip


MAX_IFBENCH_SAMPLES = 64  # replies per prompt the inconclusive IFBench gate may ask for


def ifbench_gate(report: OfflineReport, config: GatesConfig) -> Gate:
    """Fails when the candidate's per-prompt IFBench follow rate is significantly below the
    deployed model's (one-sided paired t-test); power at a fall of
    ``gates.ifbench.max_following_drop`` (``flywheel.gate_power.paired_rate_power``)."""
    from flywheel.ifbench import per_prompt_rates

    if report.ifbench is None:
        raise ValueError(
            "gates.ifbench.enabled but the offline report has no IFBench replies; fix: "
            "evaluate with the same gates config (evaluate_offline) or disable gates.ifbench"
        )
    ifb, alpha, target = config.ifbench, config.style.alpha, config.min_power
    rates = per_prompt_rates(report.ifbench)
    n, drop = len(rates), ifb.max_following_drop
    replies = int(report.ifbench.groupby("key").size().min())  # per prompt and model
    before, after = float(rates["deployed"].mean()), float(rates["candidate"].mean())
    p = paired_rate_drop_p(rates["deployed"].to_numpy(), rates["candidate"].to_numpy())
    power = paired_rate_power(n, replies, before, drop, alpha, target)
    verdict = _verdict(p < alpha, power)
    measured = (
        f"IFBench follow rate {before:.2f} -> {after:.2f} on {n} prompts x {replies} "
        f"replies (one-sided paired t-test p = {p:.2g})"
    )
    if verdict == "fail":
        reason = f"following fell significantly at alpha {alpha:g}: {measured}"
    elif verdict == "inconclusive":
        what = f"prompts detect a {drop:.2f} fall in the follow rate"
        # Our checkers cover few IFBench prompts: more replies per prompt is the lever.
        samples = next(
            (k for k in range(replies + 1, MAX_IFBENCH_SAMPLES + 1)
             if paired_rate_power(n, k, before, drop, alpha, target).enough),
            None,
        )  # fmt: skip
        fix = (
            f"raise gates.ifbench.samples to {samples}"
            if samples is not None
            else f"raise gates.ifbench.max_following_drop ({n} prompts cannot see {drop:.2f})"
        )
        reason = f"{_blind(n, what, power, alpha, fix)}; {measured}"
    else:
        reason = f"no significant fall: {measured}; {_seen(power, f'a {drop:.2f} fall')}"
    return Gate.decided(
        "ifbench", verdict, value=after, threshold=before - drop, reason=reason,
        power=power.power, n=n, n_needed=power.n_needed,
    )  # fmt: skip


def failed_reason(gates: Sequence[Gate]) -> str:
    """'gate failed: reason' / 'gate inconclusive: reason' for each gate that did not pass,
    or '' when all passed."""
    return "; ".join(
        f"{g.name} {'failed' if g.verdict == 'fail' else 'inconclusive'}: {g.reason}"
        for g in gates
        if not g.passed
    )
