"""The fidelity report card: a run's simulated users against held-out human chat.

``flywheel fidelity RUN_DIR`` reads the run store and compares what the simulated users did
with the held-out split of ``chitchat-dataset`` (``sim.chitchat``: the split the run's world
drew no openers or fallback messages from). Each line has a target and is PASS or MISS:

========================  ===============================================  =====================
line                      compares                                         target
========================  ===============================================  =====================
message words KS          words per message the user LLM wrote (turns      KS distance <= 0.10
                          after the opener, fallbacks included) vs          (``ks_2samp``)
                          held-out human follow-up messages
conversation length KS    user messages per session vs the opening          KS distance <= 0.10
                          speaker's messages per held-out conversation,
                          censored at the world's turn cap
opener distinct-2         distinct-2 of the sessions' first messages vs     >= 5th percentile of
                          held-out openers at the same count                the human bootstrap
message distinct-2        distinct-2 of the user LLM's messages vs          >= 5th percentile of
                          held-out follow-ups at the same count             the human bootstrap
assistant-speak share     user-LLM messages as sent (after their redraft,   <= 2%
                          ``sim.user_llm``) that ``assistant_speak`` flags;
                          the detail and ``redraft_share`` say how many
                          drafts were redrafted (the ``days`` table)
fallback share            user-LLM messages replaced by human text          <= 5%
                          (the ``days`` table's counters)
like / continue /         observed rate per segment vs the rate the         |z| <= 2.576 (99%)
return rate               response model implies on the logged trajectory
========================  ===============================================  =====================

The scenarios set no like / continue / return targets per segment, so those lines compare
each segment's observed rate with what the run's own configuration implies: the gold model
(``sim.gold``) is replayed over the logged replies (their logged satisfaction, features and
signals move mood, memory and emoji exposure exactly as in the simulation), giving each reply
its P(like) and P(continue) and each user-day its P(active). Given those probabilities the
draws are independent, so ``z = (observed - sum p) / sqrt(sum p (1 - p))`` is standard normal
when the simulator behaves as configured. Replies answering a user-LLM goodbye are left out
of the continue line (the goodbye, not the draw, ended those sessions; ``sim.conversation``).
These lines check the simulator against its configuration, not users against people.

Writes ``fidelity.json``, ``fidelity.md`` and ``fidelity_qq.png`` (quantiles of message
words, simulated against human) into the run directory, each through a temporary file and a
rename.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from flywheel.persist import atomic_write, atomic_write_text, json_ready
from rewards.checkers import words
from rewards.features import is_unsafe
from sim.chitchat import ChitchatCorpus, load_chitchat
from sim.gold import GoldModel, Signals
from sim.population import User, UserState, UserTraits
from sim.traffic import PRE, TrafficConfig
from sim.user_llm import assistant_speak, is_goodbye
from sim.world import WorldConfig

MESSAGE_WORDS_KS_MAX = 0.10  # KS distance, simulated vs held-out human message words
CONVERSATION_KS_MAX = 0.10  # KS distance, user messages per session (censored at the cap)
ASSISTANT_SPEAK_MAX = 0.02  # share of user-LLM messages that sound like an assistant
FALLBACK_SHARE_MAX = 0.05  # share of user-LLM messages replaced by human text
DIVERSITY_PERCENTILE = 5.0  # distinct-2 must reach this percentile of the human bootstrap
DIVERSITY_RESAMPLES = 200  # human samples of the simulated count per distinct-2 line
RATE_Z_MAX = 2.576  # two-sided 99% normal quantile for the implied-rate lines
QQ_PROBABILITIES = np.linspace(0.01, 0.99, 99)
JSON_FILE = "fidelity.json"
MARKDOWN_FILE = "fidelity.md"
QQ_FILE = "fidelity_qq.png"
EXAMPLES = 5  # assistant-speak messages quoted in the report


@dataclass(frozen=True)
class FidelityLine:
    """One line of the card: the simulated figure, the human or implied reference, the
    target in words and whether it was met (``value`` NaN: nothing to measure, a MISS)."""

    name: str
    value: float
    target: str
    passed: bool
    reference: float | None = None
    n: int = 0
    detail: str = ""

    @property
    def status(self) -> str:
        """PASS or MISS."""
        return "PASS" if self.passed else "MISS"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as None)."""
        return {
            "name": self.name,
            "value": json_ready(self.value),
            "reference": json_ready(self.reference),
            "target": self.target,
            "status": self.status,
            "n": self.n,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class FidelityCard:
    """The report card of one run (see the module docstring for the lines).

    ``goodbye_share`` is the share of sessions the user LLM closed with a goodbye and
    ``human_goodbye_share`` the share of held-out conversations whose last message is one
    (context, not a target). ``redraft_share`` is the share of user-LLM messages whose
    first draft sounded like an assistant and was sampled again (None for a run stored
    before redrafts were counted). ``sim_words`` / ``human_words`` are the two samples of
    the message-words line (for the QQ plot).
    """

    run_dir: str
    experiments: tuple[str, ...]
    lines: tuple[FidelityLine, ...]
    goodbye_share: float | None
    human_goodbye_share: float
    assistant_speak_examples: tuple[str, ...]
    redraft_share: float | None
    sim_words: np.ndarray = field(repr=False)
    human_words: np.ndarray = field(repr=False)

    @property
    def misses(self) -> list[FidelityLine]:
        """The lines that missed their target."""
        return [line for line in self.lines if not line.passed]

    def line(self, name: str) -> FidelityLine:
        """The line called ``name``."""
        for line in self.lines:
            if line.name == name:
                return line
        raise KeyError(f"no fidelity line {name!r}; lines: {[x.name for x in self.lines]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the QQ quantiles instead of the samples."""
        return {
            "run_dir": self.run_dir,
            "experiments": list(self.experiments),
            "lines": [line.to_dict() for line in self.lines],
            "passed": not self.misses,
            "misses": [line.name for line in self.misses],
            "goodbye_share": json_ready(self.goodbye_share),
            "human_goodbye_share": self.human_goodbye_share,
            "assistant_speak_examples": list(self.assistant_speak_examples),
            "redraft_share": json_ready(self.redraft_share),
            "qq": {
                "probabilities": QQ_PROBABILITIES.round(2).tolist(),
                "simulated": _quantiles(self.sim_words),
                "human": _quantiles(self.human_words),
            },
        }

    def summary(self) -> str:
        """The card as Markdown: one table row per line, then the context."""
        rows = [
            "| line | simulated | reference | target | status | n |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for line in self.lines:
            rows.append(
                f"| {line.name} | {_fmt(line.value)} | {_fmt(line.reference)} | {line.target} "
                f"| **{line.status}** | {line.n} |"
            )
        notes = [f"- {line.name}: {line.detail}" for line in self.lines if line.detail]
        goodbye = "n/a" if self.goodbye_share is None else f"{self.goodbye_share:.1%}"
        notes.append(
            f"- sessions the user LLM closed with a goodbye: {goodbye} (held-out human "
            f"conversations ending with one: {self.human_goodbye_share:.1%})"
        )
        redrafted = "n/a" if self.redraft_share is None else f"{self.redraft_share:.1%}"
        notes.append(f"- user-LLM drafts redrafted for sounding like an assistant: {redrafted}")
        notes.extend(
            f"- assistant-speak example: {text!r}" for text in self.assistant_speak_examples
        )
        verdict = (
            "every line met its target"
            if not self.misses
            else "MISSED: " + ", ".join(f"{x.name} ({_fmt(x.value)})" for x in self.misses)
        )
        return "\n".join(
            [
                f"# Simulated-user fidelity: {self.run_dir}",
                "",
                f"Experiments: {', '.join(self.experiments)}. {verdict}.",
                "",
                *rows,
                "",
                *notes,
                "",
            ]
        )


# ---------------------------------------------------------------------------- statistics
def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams over all word n-grams in ``texts``.

    Words are ``rewards.checkers.words`` lowercased; n-grams do not cross messages. NaN when
    the texts hold no n-gram.
    """
    return _distinct([_ngrams(text, n) for text in texts])


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    tokens = [w.lower() for w in words(text)]
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _distinct(grams_per_text: Sequence[list[tuple[str, ...]]]) -> float:
    grams = [g for text in grams_per_text for g in text]
    return len(set(grams)) / len(grams) if grams else math.nan


def implied_rate_z(outcomes: Sequence[bool], probabilities: Sequence[float]) -> float:
    """z of the observed count against independent Bernoulli draws with ``probabilities``.

    ``(sum outcomes - sum p) / sqrt(sum p (1 - p))`` (Poisson-binomial mean and variance);
    0 when the variance is 0 and the count equals its mean, +-inf when it does not.
    """
    y = np.asarray(outcomes, dtype=float)
    p = np.asarray(probabilities, dtype=float)
    if y.shape != p.shape:
        raise ValueError(f"implied_rate_z got {y.size} outcomes but {p.size} probabilities")
    gap = float(y.sum() - p.sum())
    sd = math.sqrt(float(np.sum(p * (1.0 - p))))
    if sd == 0:
        return 0.0 if abs(gap) < 1e-9 else math.copysign(math.inf, gap)
    return gap / sd


def ks_line(name: str, simulated: np.ndarray, human: np.ndarray, limit: float) -> FidelityLine:
    """Two-sample KS distance (``scipy.stats.ks_2samp``) against ``limit``."""
    if len(simulated) == 0:
        return FidelityLine(name, math.nan, f"KS <= {limit:.2f}", False, None, 0, "no data")
    result = stats.ks_2samp(simulated, human)
    detail = (
        f"median {np.median(simulated):g} vs human {np.median(human):g}, p90 "
        f"{np.percentile(simulated, 90):g} vs {np.percentile(human, 90):g}, "
        f"KS p-value {result.pvalue:.2g}"
    )
    statistic = float(result.statistic)
    return FidelityLine(
        name, statistic, f"KS <= {limit:.2f}", statistic <= limit, None, len(simulated), detail
    )


def diversity_line(
    name: str, simulated: Sequence[str], human: Sequence[str], rng: np.random.Generator
) -> FidelityLine:
    """Distinct-2 of ``simulated`` against ``DIVERSITY_RESAMPLES`` human samples of its size.

    Distinct-n falls as a sample grows, so the reference draws the same number of human
    messages (without replacement when there are enough); PASS when the simulated value
    reaches the ``DIVERSITY_PERCENTILE``-th percentile of the human values.
    """
    n = len(simulated)
    target = f">= human p{DIVERSITY_PERCENTILE:g}"
    if n == 0:
        return FidelityLine(name, math.nan, target, False, None, 0, "no messages")
    pool = [_ngrams(text, 2) for text in human]
    boot = [
        _distinct([pool[i] for i in rng.choice(len(pool), n, replace=n > len(pool))])
        for _ in range(DIVERSITY_RESAMPLES)
    ]
    floor = float(np.nanpercentile(boot, DIVERSITY_PERCENTILE))
    value = distinct_n(simulated)
    detail = f"human p{DIVERSITY_PERCENTILE:g} at n = {n}: {floor:.3f}"
    passed = bool(value >= floor)
    return FidelityLine(name, value, target, passed, float(np.nanmedian(boot)), n, detail)


def share_line(name: str, flagged: int, total: int, limit: float, detail: str) -> FidelityLine:
    """A share of ``total`` against an upper ``limit``."""
    if total == 0:
        return FidelityLine(name, math.nan, f"<= {limit:.0%}", False, None, 0, "no messages")
    share = flagged / total
    return FidelityLine(name, share, f"<= {limit:.0%}", share <= limit, None, total, detail)


def rate_line(name: str, outcomes: pd.Series, probabilities: pd.Series) -> FidelityLine:
    """Observed rate against the implied one (``implied_rate_z`` within ``RATE_Z_MAX``)."""
    target = f"|z| <= {RATE_Z_MAX}"
    if len(outcomes) == 0:
        return FidelityLine(name, math.nan, target, False, None, 0, "no data")
    z = implied_rate_z(outcomes.to_numpy(bool), probabilities.to_numpy(float))
    detail = f"z = {z:+.2f} against the response model's implied rate"
    return FidelityLine(
        name,
        float(outcomes.mean()),
        target,
        abs(z) <= RATE_Z_MAX,
        float(probabilities.mean()),
        len(outcomes),
        detail,
    )


# ---------------------------------------------------------------------------- replay
def replay_response_model(
    turns: pd.DataFrame,
    sessions: pd.DataFrame,
    user_days: pd.DataFrame,
    users: pd.DataFrame,
    gold: GoldModel,
    traffic: TrafficConfig,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The response model's probabilities along one experiment's logged trajectory.

    Each user starts from a fresh ``UserState``; every logged day (in order) first gets its
    P(active) = clip(return probability x weekday factor, 0, 1), as ``sim.traffic`` draws
    it, then its sessions move the state through ``GoldModel.start_session``,
    ``observe_turn`` (logged satisfaction, features, like and report) and ``end_session``.
    A twin test's lives branch from the state at the end of the pre-period.

    Returns ``turns`` with ``segment``, ``p_like`` and ``p_continued`` (P(continue) x (1 -
    P(report)): a report ends the session) and ``user_days`` with ``segment`` and
    ``p_active``.
    """
    turns = turns.copy()
    user_days = user_days.copy()
    turns["p_like"] = np.nan
    turns["p_continued"] = np.nan
    user_days["p_active"] = np.nan
    by_session = {
        key: frame.sort_values("turn_index") for key, frame in turns.groupby(["life", "session_id"])
    }
    ordered = sessions.sort_values(["day", "start_hour"])
    session_keys = {
        key: list(zip(frame["life"], frame["session_id"], strict=True))
        for key, frame in ordered.groupby(["user_id", "day", "life"])
    }
    factors = traffic.weekday_factors
    days_of = dict(tuple(user_days.groupby("user_id")))
    for row in users.itertuples(index=False):
        traits = dict(row.traits)
        traits["topic_interests"] = tuple(traits["topic_interests"])
        user = User(row.user_id, row.segment, UserTraits(**traits), UserState())
        days = days_of.get(row.user_id, user_days.iloc[:0]).sort_values("day")
        pre = days[days["period"] == PRE]
        live_state = None
        for frame, branch in [(pre, False)] + [
            (rows, True) for _, rows in days[days["period"] != PRE].groupby("life")
        ]:
            if branch:
                if live_state is None:
                    live_state = copy.deepcopy(user.state)
                user.state = copy.deepcopy(live_state)
            for index, day_row in frame.iterrows():
                day = int(day_row["day"])
                p_return = gold.return_probability(user, day) * factors[traffic.weekday(day)]
                user_days.at[index, "p_active"] = float(np.clip(p_return, 0.0, 1.0))
                for key in session_keys.get((row.user_id, day, day_row["life"]), []):
                    _replay_session(user, day, by_session.get(key), gold, turns)
    segments = users.set_index("user_id")["segment"]
    turns["segment"] = turns["user_id"].map(segments)
    user_days["segment"] = user_days["user_id"].map(segments)
    return turns, user_days


@dataclass(frozen=True)
class LoggedReply:
    """What the response model (``p_like``, ``p_report``) and the transitions
    (``observe_turn``) read of a reply, rebuilt from its logged features: the style features
    and whether it was unsafe as shown. (The utility itself is logged, so the judge's scores
    and the checkers that ``sim.gold.ReplyAssessment`` also carries are not needed.)"""

    features: dict[str, float]
    unsafe: bool


def _replay_session(
    user: User, day: int, frame: pd.DataFrame | None, gold: GoldModel, out: pd.DataFrame
) -> None:
    """One logged session through the gold model, writing each reply's probabilities."""
    gold.start_session(user, day)
    for index, turn in [] if frame is None else frame.iterrows():
        features = {k: float(v) for k, v in turn["features"].items()}
        reply = LoggedReply(features, is_unsafe(features["offensive"]))
        utility = float(turn["gold_satisfaction"])
        p_like = gold.p_like(user, utility, reply)  # type: ignore[arg-type]
        p_report = gold.p_report(user, utility, reply)  # type: ignore[arg-type]
        p_continue = gold.p_continue(user, utility, int(turn["turn_index"]))
        out.at[index, "p_like"] = p_like
        out.at[index, "p_continued"] = p_continue * (1.0 - p_report)
        signals = Signals(
            liked=bool(turn["liked"]),
            reported=bool(turn["reported"]),
            continued=bool(turn["continued"]),
            p_like=p_like,
            p_report=p_report,
            p_continue=p_continue,
        )
        gold.observe_turn(user, utility, reply, signals)  # type: ignore[arg-type]
    gold.end_session(user, day)


# ---------------------------------------------------------------------------- the card
@dataclass(frozen=True)
class RunLogs:
    """What the card reads of a run: its logged tables and each experiment's config."""

    turns: pd.DataFrame
    sessions: pd.DataFrame
    user_days: pd.DataFrame
    users: pd.DataFrame
    days: pd.DataFrame
    configs: Mapping[str, Mapping[str, Any]]


def read_logs(run_dir: str | Path, experiment_id: str | None = None) -> RunLogs:
    """The run's tables (one experiment's, or every experiment's) and configs."""
    from flywheel.store import DB_FILE, RunStore

    if not (Path(run_dir) / DB_FILE).is_file():
        raise FileNotFoundError(
            f"{Path(run_dir) / DB_FILE} does not exist; fix: pass a run directory written by "
            "`flywheel ab` or `flywheel run`"
        )
    with RunStore(run_dir, read_only=True) as store:
        experiments = store.experiments()
        known = list(experiments["experiment_id"])
        if experiment_id is not None and experiment_id not in known:
            raise ValueError(f"--experiment {experiment_id!r} is not in {run_dir}; one of {known}")
        logs = RunLogs(
            turns=store.read_turns(experiment_id),
            sessions=store.read_sessions(experiment_id),
            user_days=store.read_user_days(experiment_id),
            users=store.read_users(experiment_id),
            days=store.read_days(experiment_id),
            configs=dict(zip(experiments["experiment_id"], experiments["config"], strict=True)),
        )
    if logs.turns.empty:
        raise ValueError(f"{run_dir} has no logged turns; run traffic (`flywheel ab`) first")
    return logs


def experiment_world(config: Mapping[str, Any]) -> tuple[WorldConfig, TrafficConfig]:
    """The world and traffic an experiment ran with (``flywheel run`` stores them at the top
    level, ``flywheel ab`` under ``scenario``)."""
    holder = config if "world" in config else config.get("scenario", {})
    if "world" not in holder or "traffic" not in holder:
        raise ValueError(
            "the experiment's stored config records no [world] / [traffic]; fix: rerun it with "
            "this version's `flywheel ab` or `flywheel run`"
        )
    return WorldConfig.from_stored(holder["world"]), TrafficConfig.model_validate(holder["traffic"])


def fidelity_card(
    run_dir: str | Path,
    *,
    experiment_id: str | None = None,
    seed: int = 0,
    corpus: ChitchatCorpus | None = None,
) -> FidelityCard:
    """The report card of ``run_dir`` (every experiment pooled, or ``experiment_id``).

    Args:
        run_dir: a run directory (``run.duckdb``).
        experiment_id: restrict to one experiment.
        seed: seeds the human resamples of the distinct-2 lines.
        corpus: the chit-chat corpus; default: the split the run's world was built with.
    """
    logs = read_logs(run_dir, experiment_id)
    ids = sorted(logs.turns["experiment_id"].unique())
    worlds = {eid: experiment_world(logs.configs[eid]) for eid in ids}
    cap, fraction, split_seed = _pooled_world(worlds)
    corpus = corpus or load_chitchat(fraction, split_seed)
    rng = np.random.default_rng(seed)

    turns = logs.turns
    written = turns[turns["turn_index"] >= 1]  # messages the user LLM was asked to write
    openers = turns.loc[turns["turn_index"] == 0, "user_message"]
    human_replies = corpus.replies("heldout")
    sim_words = np.array([len(words(m)) for m in written["user_message"]], dtype=int)
    human_words = np.array([len(words(m)) for m in human_replies], dtype=int)
    human_sessions = np.minimum(corpus.opener_messages_per_conversation("heldout"), cap)
    flags = [assistant_speak(m) for m in written["user_message"]]
    flagged = [m for m, f in zip(written["user_message"], flags, strict=True) if f]
    totals = user_llm_totals(logs.days)
    lines = [
        ks_line("message words KS", sim_words, human_words, MESSAGE_WORDS_KS_MAX),
        ks_line(
            "conversation length KS",
            logs.sessions["n_user_messages"].to_numpy(int),
            human_sessions,
            CONVERSATION_KS_MAX,
        ),
        diversity_line("opener distinct-2", list(openers), corpus.openers("heldout"), rng),
        diversity_line("message distinct-2", list(written["user_message"]), human_replies, rng),
        share_line(
            "assistant-speak share",
            len(flagged),
            len(written),
            ASSISTANT_SPEAK_MAX,
            f"as sent: {_pattern_counts(flags)}; {redraft_text(totals)}",
        ),
        share_line(
            "fallback share",
            totals.fallbacks,
            totals.messages,
            FALLBACK_SHARE_MAX,
            f"{totals.fallbacks} of {totals.messages} user-LLM messages were human text",
        ),
        *_rate_lines(logs, worlds),
    ]
    return FidelityCard(
        run_dir=str(run_dir),
        experiments=tuple(ids),
        lines=tuple(lines),
        goodbye_share=_goodbye_share(turns),
        human_goodbye_share=float(
            np.mean([is_goodbye(c[-1]) for c in corpus.conversations("heldout") if c])
        ),
        assistant_speak_examples=tuple(flagged[:EXAMPLES]),
        redraft_share=totals.redraft_share,
        sim_words=sim_words,
        human_words=human_words,
    )


def _pooled_world(
    worlds: Mapping[str, tuple[WorldConfig, TrafficConfig]],
) -> tuple[int, float, int]:
    """(turn cap, held-out fraction, split seed) the experiments share: pooled, they are
    compared with one held-out human split, which must be one their openers never came from."""
    caps = {world.turn_cap for world, _ in worlds.values()}
    splits = {(w.chitchat.heldout_fraction, w.chitchat.split_seed) for w, _ in worlds.values()}
    if len(caps) > 1 or len(splits) > 1:
        raise ValueError(
            f"experiments {sorted(worlds)} differ in turn cap {sorted(caps)} or chit-chat split "
            f"{sorted(splits)}; fix: pass --experiment to read one"
        )
    if any(w.chitchat.opener_split == "heldout" for w, _ in worlds.values()):
        raise ValueError(
            "the run drew openers from the held-out chit-chat split, so it has no held-out "
            "human chat to be measured against; fix: use world.chitchat.opener_split = 'train'"
        )
    fraction, split_seed = splits.pop()
    return caps.pop(), fraction, split_seed


def _rate_lines(
    logs: RunLogs, worlds: Mapping[str, tuple[WorldConfig, TrafficConfig]]
) -> list[FidelityLine]:
    """Like, continue and return rate per segment against the replayed response model."""
    replayed_turns, replayed_days = [], []
    for eid, (world, traffic) in worlds.items():
        mine = {
            name: frame[frame["experiment_id"] == eid]
            for name, frame in (
                ("turns", logs.turns),
                ("sessions", logs.sessions),
                ("user_days", logs.user_days),
                ("users", logs.users),
            )
        }
        t, d = replay_response_model(**mine, gold=GoldModel(world.gold), traffic=traffic)
        replayed_turns.append(t)
        replayed_days.append(d)
    turns = pd.concat(replayed_turns, ignore_index=True)
    user_days = pd.concat(replayed_days, ignore_index=True)
    answered_goodbye = (turns["turn_index"] >= 1) & turns["user_message"].map(is_goodbye)
    lines = []
    for segment in sorted(turns["segment"].dropna().unique()):
        seg = turns[turns["segment"] == segment]
        kept = seg[~answered_goodbye[seg.index]]
        active = user_days[user_days["segment"] == segment]
        lines += [
            rate_line(f"like rate ({segment})", seg["liked"], seg["p_like"]),
            rate_line(f"continue rate ({segment})", kept["continued"], kept["p_continued"]),
            rate_line(f"return rate ({segment})", active["active"], active["p_active"]),
        ]
    return lines


@dataclass(frozen=True)
class UserLLMTotals:
    """The days table's user-LLM counters summed: messages asked for, of them fallbacks
    (human text sent instead) and redrafts (None: stored before redrafts were counted)."""

    messages: int
    fallbacks: int
    redrafts: int | None

    @property
    def redraft_share(self) -> float | None:
        """Redrafts per message asked for (None when unknown or nothing was asked for)."""
        if self.redrafts is None or self.messages == 0:
            return None
        return self.redrafts / self.messages


def user_llm_totals(days: pd.DataFrame) -> UserLLMTotals:
    """The user-LLM counters of the days table ``days`` summed (a run stored before
    redrafts were counted has no ``user_redrafts`` column: its redrafts are None)."""
    redrafts = int(days["user_redrafts"].sum()) if "user_redrafts" in days else None
    return UserLLMTotals(
        int(days["user_messages"].sum()), int(days["user_fallbacks"].sum()), redrafts
    )


def redraft_text(totals: UserLLMTotals) -> str:
    """The redrafts in words: '10 of 100 drafts were redrafted (10.0%)'."""
    if totals.redraft_share is None:
        return "redrafts not recorded"
    return (
        f"{totals.redrafts} of {totals.messages} drafts were redrafted ({totals.redraft_share:.1%})"
    )


def _goodbye_share(turns: pd.DataFrame) -> float | None:
    """Share of sessions whose last answered user message (after the opener) is a goodbye."""
    if turns.empty:
        return None
    last = turns.sort_values("turn_index").groupby(["experiment_id", "life", "session_id"]).last()
    return float(((last["turn_index"] >= 1) & last["user_message"].map(is_goodbye)).mean())


def _pattern_counts(flags: Sequence[tuple[str, ...]]) -> str:
    counts: dict[str, int] = {}
    for names in flags:
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none flagged"


# ---------------------------------------------------------------------------- output
def write_fidelity(card: FidelityCard, run_dir: str | Path) -> dict[str, Path]:
    """Write ``fidelity.json``, ``fidelity.md`` and the QQ plot into ``run_dir``, atomically."""
    root = Path(run_dir)
    paths = {"json": root / JSON_FILE, "markdown": root / MARKDOWN_FILE, "qq": root / QQ_FILE}
    atomic_write_text(paths["json"], json.dumps(card.to_dict(), indent=2, allow_nan=False) + "\n")
    atomic_write_text(paths["markdown"], card.summary())
    qq_plot(card, paths["qq"])
    return paths


def qq_plot(card: FidelityCard, path: Path) -> Path:
    """Quantiles of simulated message words against held-out human ones (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    human = np.quantile(card.human_words, QQ_PROBABILITIES)
    fig, ax = plt.subplots(figsize=(5, 5))
    if len(card.sim_words):
        ax.plot(human, np.quantile(card.sim_words, QQ_PROBABILITIES), "o", ms=3, label="quantiles")
    top = max(float(human.max()), float(card.sim_words.max()) if len(card.sim_words) else 0)
    ax.plot([0, top], [0, top], "k--", lw=1, label="y = x (same distribution)")
    ks = card.line("message words KS")
    ax.set(
        xlabel="held-out human message words",
        ylabel="simulated user message words",
        title=f"Message words QQ (KS {_fmt(ks.value)}: {ks.status})",
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return path


def _fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3f}"


def _quantiles(sample: np.ndarray) -> list[float]:
    if len(sample) == 0:
        return []
    return [float(q) for q in np.quantile(sample, QQ_PROBABILITIES)]
