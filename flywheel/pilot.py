"""``flywheel plan``: size a scenario's A/B test from a pilot, for both designs, with its cost.

The statistics live in :mod:`flywheel.ab.planner`; this module gets it a pilot and a price:

1. The pilot: a logged experiment (``--pilot RUN_DIR``), or a twin pilot of the scenario's
   own world and traffic run here into ``runs/plan/<name>`` (resumable like any
   ``flywheel ab`` run). A twin pilot measures both designs at once: its standard view is
   the standard design, its pairs the twin design.
2. The price: generated tokens per simulated user-day (bot and user replies) and seconds per
   generated token, both read from the pilot's ``days`` table, so the CPU minutes are those
   of this machine and backend at the pilot's batch sizes.

A ``flywheel run`` scenario (``scenarios/quickstart.toml``) works as well as a ``flywheel ab``
one: the pilot uses its ``seed``, ``[world]``, ``[traffic]``, ``[serving]`` and
``[analysis]``, and its ``[policy]`` as the default control.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from flywheel.ab.planner import Plan, plan_experiment
from flywheel.experiment import (
    EXPERIMENT_ID,
    ABOutcome,
    ABScenario,
    load_scenario,
    run_ab,
    with_design,
)
from flywheel.store import RunStore
from policies import PolicySpec

# Tables of a ``flywheel run`` scenario that a pilot A/B test takes over as they are.
SHARED_TABLES = ("name", "description", "seed", "world", "traffic", "serving", "analysis")


@dataclass(frozen=True)
class Pilot:
    """A pilot's user-day table and what its simulation cost on this machine."""

    table: pd.DataFrame
    tokens_per_user_day: float  # bot + user generated tokens per simulated user-day
    seconds_per_token: float  # wall seconds of the simulation per generated token
    source: str


def pilot_scenario(path: str | Path) -> tuple[ABScenario, str]:
    """The A/B scenario a pilot of ``path`` runs, and its default control POLICY.

    A ``flywheel run`` scenario keeps its shared tables; its ``[policy]`` model is the
    control and its backend settings serve the arms. A ``flywheel ab`` scenario is loaded as
    it is, with ``smollm2`` as control.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scenario file {path} does not exist; pass a .toml scenario")
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    if "generations" not in data and "policy" not in data:
        return load_scenario(path), "smollm2"
    deployed = PolicySpec.model_validate(data.get("policy", {}))
    shared = {k: v for k, v in data.items() if k in SHARED_TABLES}
    scenario = ABScenario.model_validate({**shared, "arms": deployed.model_dump()})
    world = scenario.world.resolved(path.parent)
    return scenario.model_copy(update={"world": world}), deployed.model


def run_pilot(
    scenario: ABScenario,
    control: str,
    treatment: str,
    out: Path,
    *,
    users: int | None = None,
    progress: bool = True,
) -> ABOutcome:
    """Run (or resume) a twin pilot of ``scenario`` into ``out``; ``users`` resizes it."""
    twins = with_design(scenario, "twins")
    if users is not None:
        traffic = twins.traffic.model_validate({**twins.traffic.model_dump(), "n_users": users})
        twins = twins.model_copy(update={"traffic": traffic})
    return run_ab(twins, control, treatment, out, progress=progress)


def read_pilot(run_dir: Path, experiment_id: str = EXPERIMENT_ID) -> Pilot:
    """A logged experiment as a pilot: its user-day table and its measured cost."""
    with RunStore(run_dir, read_only=True) as store:
        table = store.analysis_table(experiment_id)
        days = store.read_days(experiment_id)
    tokens = float(days["bot_tokens"].sum() + days["user_tokens"].sum())
    if tokens <= 0:
        raise ValueError(
            f"experiment {experiment_id!r} in {run_dir} generated no tokens; a pilot needs "
            "simulated traffic to price the plan"
        )
    return Pilot(
        table=table,
        tokens_per_user_day=tokens / len(table),
        seconds_per_token=float(days["wall_s"].sum()) / tokens,
        source=f"{run_dir} (experiment {experiment_id!r})",
    )


# A simulated user's activity on a day is drawn from their state the evening before, so the
# first test day's breadth cannot show the treatment in either design (in a twin test both
# lives are even identical that day): a plan needs at least two test days.
MIN_TEST_DAYS = 2


def plan(
    pilot: Pilot, scenario: ABScenario, mde: float, power: float | None = None
) -> tuple[Plan, ...]:
    """Both designs' plans for ``mde`` at the scenario's alpha and ``power`` (default: its)."""
    config = scenario.analysis_config()
    return plan_experiment(
        pilot.table,
        mde=mde,
        seconds_per_token=pilot.seconds_per_token,
        alpha=config.alpha,
        power=config.power if power is None else power,
        tokens_per_user_day=pilot.tokens_per_user_day,
        min_days=MIN_TEST_DAYS,
        config=config,
    )


def scenario_verdict(pilot: Pilot, scenario: ABScenario, mde: float) -> list[str]:
    """Whether the scenario's own test (its design, users and test days) reaches ``mde``:
    the users the plan needs at exactly the scenario's test days, against its users."""
    traffic = scenario.traffic
    config = scenario.analysis_config()
    at_its_days = plan_experiment(
        pilot.table,
        mde=mde,
        seconds_per_token=pilot.seconds_per_token,
        alpha=config.alpha,
        power=config.power,
        tokens_per_user_day=pilot.tokens_per_user_day,
        days=traffic.test_days,
        config=config,
    )
    lines = []
    for p in at_its_days:
        if p.design != traffic.design:
            continue
        verdict = "reaches" if traffic.n_users >= p.users else "does NOT reach"
        lines.append(
            f"{p.metric}: the scenario's {traffic.design} test ({traffic.n_users} users x "
            f"{traffic.test_days} test days) {verdict} a {mde:+.0%} MDE at power "
            f"{config.power:.0%}: {p.users:,} users are needed over {traffic.test_days} days"
        )
    return lines
