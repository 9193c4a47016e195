"""``flywheel chat``: N conversations of a character policy against LLM-simulated users.

Runs the world of a scenario file (its ``[world]`` table, ``sim.world.WorldConfig``) for one
simulated day: samples N users, opens their sessions, alternates ONE batched bot call and
ONE batched user-LLM call per round until every conversation has ended, then prints a few
transcripts with their signals, the steerability table and an engagement summary. Oracle
numbers (gold satisfaction, return probability) are printed apart and labelled as such.

The bot is served to the simulated users as in ``flywheel run`` and ``flywheel ab``: through
the fail-closed safety check (``sim.serving.serve``) of the scenario's ``[serving]`` table
(defaults when the file has none); the summary counts the replies it replaced.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import ValidationError
from tqdm.auto import tqdm

from policies import PolicySpec, SamplingParams, load_policy
from rewards.steerability import SteerabilityResult, steerability
from sim.conversation import Session
from sim.serving import (
    BLOCKED,
    CHECKER_ERROR,
    CHECKER_TIMEOUT,
    ServingConfig,
    ServingEvent,
    serve,
)
from sim.world import World, load_world_config


@dataclass(frozen=True)
class ChatRun:
    """What one ``flywheel chat`` run produced."""

    sessions: list[Session]
    turns: pd.DataFrame  # TurnRecord.to_row() per bot reply
    summaries: pd.DataFrame  # SessionRecord.to_row() per session, plus return_probability
    steerability: SteerabilityResult
    serving_events: list[ServingEvent]  # replies the safety check replaced, in order


def load_serving_config(path: str | Path) -> ServingConfig:
    """The ``[serving]`` table of a scenario TOML file (defaults where it has none).

    Raises ValueError naming the field path (``scenario.serving.<field>``), the value and
    the fix.
    """
    from flywheel.experiment import explain

    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("serving", {})
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from err
    try:
        return ServingConfig.model_validate(table)
    except ValidationError as err:
        detail = explain(err, ServingConfig, prefix="scenario.serving")
        raise ValueError(f"{path}: invalid [serving] table\n{detail}") from None


def run_chat(
    scenario: str | Path,
    users: int,
    seed: int = 0,
    bot: PolicySpec | None = None,
    bot_params: SamplingParams | None = None,
    progress: bool = True,
) -> ChatRun:
    """Simulate ``users`` conversations on day 0 of the scenario's world."""
    if users < 1:
        raise ValueError(f"--users must be >= 1, got {users}")
    world = World.build(load_world_config(scenario), seed=seed)
    bot_policy = serve(load_policy(bot or PolicySpec()), load_serving_config(scenario))
    bot_params = bot_params or SamplingParams(max_new_tokens=48, temperature=0.7, seed=seed)
    engine = world.engine
    sessions = engine.open_sessions(world.sampler.sample(users), 0, 12.0, world.rng)
    live = list(sessions)
    bar = tqdm(total=world.config.turn_cap, desc="rounds", unit="round", disable=not progress)
    round_index = 0
    while live:
        params = SamplingParams(
            bot_params.max_new_tokens, bot_params.temperature, bot_params.top_p,
            bot_params.seed + round_index,
        )  # fmt: skip
        engine.bot_turn(live, bot_policy, params)
        live = [s for s in live if not s.ended]
        engine.user_turn(live, world.user_params(seed + 1000 + round_index))
        round_index += 1
        bar.update(1)
        bar.set_postfix(open=len(live))
    bar.close()
    summaries = []
    for session in sessions:
        row = engine.close_session(session).to_row()
        row["return_probability"] = engine.return_probability(session.user, 1)
        summaries.append(row)
    turns = pd.DataFrame([t.to_row() for s in sessions for t in s.turns])
    return ChatRun(
        sessions, turns, pd.DataFrame(summaries), steerability(turns), list(bot_policy.events)
    )


def format_transcript(session: Session) -> str:
    """A session as text: messages, and under each reply its signals and checks."""
    user = session.user
    head = (
        f"--- {session.session_id}: {user.user_id} ({user.segment}) with "
        f"{session.character.name}, ended: {session.end_reason} ---"
    )
    lines = [head]
    turns = iter(session.turns)
    for message in session.messages:
        if message["role"] == "user":
            lines.append(f"user: {message['content']}")
            continue
        t = next(turns)
        lines.append(f"{session.character.name}: {message['content']}")
        checks = " ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in t.checks.items())
        lines.append(
            f"    [liked={t.liked} continued={t.continued} reported={t.reported} "
            f"follows_all={t.follows_all} violates={t.violates_any}] {checks} "
            f"(oracle gold={t.gold_satisfaction:+.2f})"
        )
    return "\n".join(lines)


def engagement_summary(run: ChatRun) -> str:
    """Observable engagement, then the oracle numbers, as a few aligned lines."""
    t, s = run.turns, run.summaries
    unchecked = t["serving_event"].isin([CHECKER_ERROR, CHECKER_TIMEOUT])
    ends = s["end_reason"].value_counts(normalize=True)
    observable = [
        ("sessions", f"{len(s)}"),
        ("bot replies", f"{len(t)}"),
        ("user messages / session", f"{s['n_user_messages'].mean():.2f}"),
        ("bot replies / session", f"{s['n_turns'].mean():.2f}"),
        ("like rate / reply", f"{t['liked'].mean():.3f}"),
        ("sessions with a like", f"{s['liked'].mean():.3f}"),
        ("report rate / reply", f"{t['reported'].mean():.3f}"),
        ("unsafe rate / reply (attempted)", f"{t['unsafe'].mean():.3f}"),
        ("blocked by serving / reply", f"{(t['serving_event'] == BLOCKED).mean():.3f}"),
        ("unchecked (checker failed) / reply", f"{unchecked.mean():.3f}"),
        ("mean words / reply", f"{t['feature_words'].mean():.1f}"),
        ("replies with emoji", f"{(t['feature_emoji'] > 0).mean():.3f}"),
        ("ended: " + ", ".join(ends.index), ", ".join(f"{v:.2f}" for v in ends.to_numpy())),
    ]
    oracle = [
        ("mean gold satisfaction", f"{t['gold_satisfaction'].mean():+.3f}"),
        ("mean P(return on day 1)", f"{s['return_probability'].mean():.3f}"),
    ]
    width = max(len(k) for k, _ in observable + oracle) + 2
    lines = ["engagement (observable):"]
    lines += [f"  {k:<{width}}{v}" for k, v in observable]
    lines.append("oracle (evaluation only, never a training signal):")
    lines += [f"  {k:<{width}}{v}" for k, v in oracle]
    return "\n".join(lines)


def segment_table(run: ChatRun) -> str:
    """Per-segment engagement, to see segments react differently."""
    s = run.summaries
    table = s.groupby("segment").agg(
        sessions=("session_id", "size"),
        turns=("n_turns", "mean"),
        like_share=("liked", "mean"),
        gold=("mean_gold_satisfaction", "mean"),
        p_return=("return_probability", "mean"),
    )
    return table.to_string(float_format=lambda x: f"{x:.3f}")


def print_run(run: ChatRun, show: int, echo=print) -> None:
    """Print ``show`` transcripts and the summaries."""
    rng = np.random.default_rng(0)
    picked = sorted(rng.choice(len(run.sessions), size=min(show, len(run.sessions)), replace=False))
    for i in picked:
        echo(format_transcript(run.sessions[int(i)]))
        echo("")
    echo("steerability:")
    echo(run.steerability.summary())
    echo("")
    echo(engagement_summary(run))
    echo("")
    echo("by segment:")
    echo(segment_table(run))
