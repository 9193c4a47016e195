"""One simulated A/B experiment, end to end: ``flywheel ab SCENARIO --control P --treatment P``.

1. Load and validate the scenario file (``ABScenario``: ``seed``, ``[world]``, ``[traffic]``,
   ``[analysis]``); every error names the field, the value seen and the fix.
2. Open the run store (``RUN_DIR/run.duckdb``). If this experiment is already stored with
   the same scenario, policies and seed, the run resumes after its last committed day; a
   different configuration is refused, so two runs are never spliced together.
3. Build the world (characters, users, gold utility, user LLM) and the arm policies; the
   same model named twice (both arms, or an arm and the user LLM) is loaded once. Each arm
   is served through the fail-closed safety check of the scenario's ``[serving]`` table
   (``sim.serving.serve``, as in ``flywheel run``); every reply it replaces is recorded in
   the run store's ``serving_events`` table (``flywheel.ledger``) under experiment ``ab``,
   with the arm's policy name.
4. Run the traffic model (``sim.traffic``) day by day into the store.
5. Analyse the user-day table (``analyze_experiment``: ``flywheel.ab.analyze``, or for a twin
   test ``flywheel.ab.paired.analyze_paired`` beside the standard view) and write ``RUN_DIR/ab/``:
   ``result.json`` (per metric lift, CI, p-value, CUPED variance reduction; SRM p-value;
   decision and reason), ``report.md``, ``daily.png``, ``lift.png`` and ``simulation.json``
   (wall time, tokens, backend calls, batch sizes, serving events per policy and kind).

A POLICY on the command line is a model (HF id, local folder, ``smollm2``) or a planted
treatment around one (``sim.planted``), so the guardrails have something to catch:
``violate[@RATE]:MODEL`` breaks the characters' prohibitions on a share RATE of replies,
``unsafe[@RATE]:MODEL`` writes replies the safety check blocks (the unsafe-rate guardrail
counts the attempts, so it holds such a treatment although users saw only fallbacks).
"""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flywheel.ledger import Ledger
from flywheel.scenario import AnalysisSettings, explain, warn_ab_power
from flywheel.store import (
    SCHEMA_VERSION,
    ExperimentSink,
    RunStore,
    fallback_text,
    fallback_totals,
)
from policies import Policy, PolicySpec, load_policy
from sim.serving import ServingConfig, ServingEvent, serve
from sim.traffic import CONTROL, TREATMENT, TrafficConfig
from sim.world import WorldConfig

if TYPE_CHECKING:
    from flywheel.ab import ABResult, AnalysisConfig
    from flywheel.ab.paired import PairedResult

EXPERIMENT_ID = "ab"
AB_DIR = "ab"
_TRAFFIC_STREAM = 0x7AFF1C  # keeps the traffic generator apart from the world's (same seed)


class ABScenario(BaseModel):
    """A scenario file for ``flywheel ab``. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("ab", min_length=1, description="Label in reports.")
    description: str = Field("", description="What this scenario is for, in words.")
    seed: int = Field(0, description="Seeds the world, the population drift and the traffic.")
    world: WorldConfig = Field(
        default_factory=WorldConfig, description="The simulated world (sim.world.WorldConfig)."
    )
    traffic: TrafficConfig = Field(
        default_factory=TrafficConfig, description="Days, arrivals, arms (sim.traffic)."
    )
    serving: ServingConfig = Field(
        default_factory=ServingConfig,
        description="The fail-closed safety check both arms are served through (sim.serving).",
    )
    arms: PolicySpec = Field(
        default_factory=PolicySpec,
        description="Backend settings (backend, dtype, batch_size, prefix_cache_tokens, ...) "
        "of the POLICYs named by --control and --treatment; their model comes from the "
        "command line, so this table's model is ignored.",
    )
    analysis: AnalysisSettings = Field(
        default_factory=AnalysisSettings,
        description="flywheel.ab.AnalysisConfig settings: alpha, srm_alpha, cuped, correction, "
        "power, retention_day, noninferiority_margins, absolute_margins (treatment_share comes "
        "from [traffic]).",
    )

    def analysis_config(self) -> AnalysisConfig:
        """The ``flywheel.ab.AnalysisConfig`` of this scenario."""
        return self.analysis.build(treatment_share=self.traffic.treatment_share)


def load_scenario(path: str | Path) -> ABScenario:
    """Read and validate a scenario TOML file; ``world.characters_dir`` is resolved next to it.

    Raises:
        FileNotFoundError: no such file.
        ValueError: bad TOML or a bad field; the message lists every problem with its
            field path, the value seen and what the field expects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scenario file {path} does not exist; pass a .toml scenario")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from err
    try:
        scenario = ABScenario.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"{path}: invalid scenario\n{explain(err, ABScenario)}") from None
    world = scenario.world.resolved(path.parent)
    warn_ab_power(world, scenario.traffic, scenario.analysis_config(), str(path))
    return scenario.model_copy(update={"world": world})


# ---------------------------------------------------------------------------- policies
class PolicyCache:
    """Loads each distinct ``PolicySpec`` once: the same model named twice is shared.

    ``arm_settings`` gives the backend settings of command-line POLICYs (``arm``).
    """

    def __init__(self, arm_settings: PolicySpec | None = None) -> None:
        self._loaded: dict[PolicySpec, Policy] = {}
        self.arm_settings = arm_settings or PolicySpec()

    def get(self, spec: PolicySpec) -> Policy:
        """The policy for ``spec``, loading it the first time."""
        if spec not in self._loaded:
            self._loaded[spec] = load_policy(spec)
        return self._loaded[spec]

    def put(self, spec: PolicySpec, policy: Policy) -> None:
        """Serve ``policy`` wherever ``spec`` is asked for (an already loaded model)."""
        self._loaded[spec] = policy

    def arm(self, text: str) -> Policy:
        """A command-line POLICY: a model, or a planted wrapper around one
        (``violate[@RATE]:MODEL``, ``unsafe[@RATE]:MODEL``, ``stylevar[@EMOJI,FILLER]:MODEL``;
        ``sim.planted``)."""
        from sim.planted import planted_policy

        def load(model: str) -> Policy:
            return self.get(self.arm_settings.model_copy(update={"model": model, "name": None}))

        return planted_policy(text, load)


# ---------------------------------------------------------------------------- the experiment
@dataclass(frozen=True)
class ABOutcome:
    """What ``run_ab`` produced: the analysis, the files and the simulation figures."""

    result: ABResult | PairedResult
    paths: dict[str, Path]
    simulation: dict[str, Any]


def run_ab(
    scenario: str | Path | ABScenario,
    control: str,
    treatment: str,
    out: str | Path,
    *,
    progress: bool = True,
    on_day_end: Callable[[int], None] | None = None,
    policy_cache: PolicyCache | None = None,
    design: str | None = None,
) -> ABOutcome:
    """Run (or resume) the A/B experiment of a scenario into ``out`` and analyse it.

    Args:
        scenario: the scenario TOML file, or a loaded scenario.
        control: POLICY serving the control arm (and everyone in the pre-period).
        treatment: POLICY serving the treatment arm during the test.
        out: the run directory (created; an existing one is resumed).
        progress: progress bar over simulated days.
        on_day_end: called with each committed day (fault injection in tests).
        policy_cache: share loaded models across calls (tests, benchmarks).
        design: "standard" or "twins", overriding the scenario's ``traffic.design``.
    """
    if not isinstance(scenario, ABScenario):
        scenario = load_scenario(scenario)
    if design is not None:
        scenario = with_design(scenario, design)
    out = Path(out)
    config = {
        "scenario": scenario.model_dump(mode="json"),
        "control": control,
        "treatment": treatment,
        "schema_version": SCHEMA_VERSION,
    }
    started = time.perf_counter()
    with RunStore(out) as store:
        sink = store.open_sink(EXPERIMENT_ID, config)
        status = store.experiment_status(EXPERIMENT_ID)
        if status is None or not status.finished:
            cache = policy_cache or PolicyCache(scenario.arms)
            simulate_traffic(
                store,
                sink,
                scenario,
                cache,
                control=control,
                treatment=treatment,
                progress=progress,
                on_day_end=on_day_end,
            )
        table = store.analysis_table(EXPERIMENT_ID)
        result = analyze_experiment(table, scenario.analysis_config())
        store.write_analysis(EXPERIMENT_ID, "ab", result.to_dict())
        simulation = simulation_record(store, scenario, config, started)
        title = f"A/B test '{scenario.name}': {treatment} vs {control}"
        paths = write_ab_files(out / AB_DIR, result, table, simulation, title)
    return ABOutcome(result, paths, simulation)


def simulate_traffic(
    store: RunStore,
    sink: ExperimentSink,
    scenario: ABScenario,
    cache: PolicyCache,
    *,
    control: str,
    treatment: str,
    progress: bool,
    on_day_end: Callable[[int], None] | None,
) -> None:
    """Simulate the experiment's days not yet committed to ``sink``: build the world and its
    drifted population, serve both arms through the safety check (each replaced reply is a
    serving event in the ledger) and run the traffic model day by day."""
    from sim.traffic import CountingPolicy, TrafficSimulator, drifted_population
    from sim.world import World

    ledger = Ledger(store)

    def record(event: ServingEvent) -> None:
        ledger.record_serving_event(EXPERIMENT_ID, event.to_row())

    arms = served_arms(cache, control, treatment, scenario.serving, record)
    user_policy = CountingPolicy(cache.get(scenario.world.user_llm.policy))
    world = World.build(scenario.world, seed=scenario.seed, user_policy=user_policy)
    population = drifted_population(world.sampler, scenario.traffic, scenario.seed)
    simulator = TrafficSimulator(
        world.engine,
        population.users,
        arms,
        scenario.traffic,
        seed=[scenario.seed, _TRAFFIC_STREAM],
        joined=population.joined,
        user_params=world.user_params,
        user_counter=user_policy,
        progress=progress,
    )
    simulator.run(sink, on_day_end=on_day_end)


def simulation_record(
    store: RunStore, scenario: ABScenario, config: Mapping[str, Any], started: float
) -> dict[str, Any]:
    """``simulation.json``: the stored days' totals, the serving events per policy and kind,
    and the wall time of this invocation since ``started`` (``time.perf_counter``)."""
    simulation = simulation_summary(store.read_days(EXPERIMENT_ID), scenario, config)
    simulation["serving_events"] = serving_event_counts(Ledger(store).serving_events(EXPERIMENT_ID))
    simulation["wall_s_this_invocation"] = time.perf_counter() - started
    return simulation


def write_ab_files(
    ab_dir: Path,
    result: ABResult | PairedResult,
    table: pd.DataFrame,
    simulation: Mapping[str, Any],
    title: str,
) -> dict[str, Path]:
    """Write the A/B report (``flywheel.ab_report``) into ``ab_dir``, then ``simulation.json``
    and the report's simulation and serving sections; return the files by name."""
    from flywheel.ab_report import write_report

    paths = write_report(result, table, ab_dir, title=title)
    paths["simulation"] = ab_dir / "simulation.json"
    paths["simulation"].write_text(json.dumps(simulation, indent=2) + "\n")
    with paths["report"].open("a") as report:
        report.write("\n" + simulation_markdown(simulation))
        report.write("\n" + serving_markdown(simulation["serving_events"]))
    return paths


def with_design(scenario: ABScenario, design: str) -> ABScenario:
    """``scenario`` with ``traffic.design`` set to ``design``, validated like the file."""
    try:
        traffic = TrafficConfig.model_validate({**scenario.traffic.model_dump(), "design": design})
    except ValidationError as err:
        raise ValueError(
            f"--design {design!r} is not a traffic design; use 'standard' or 'twins'"
        ) from err
    return scenario.model_copy(update={"traffic": traffic})


def analyze_experiment(table: pd.DataFrame, config: AnalysisConfig) -> ABResult | PairedResult:
    """The A/B analysis of a simulated experiment's user-day table, whatever its design:
    ``flywheel.ab.analyze`` for a standard test, the paired analysis for a twin test."""
    from flywheel.ab import analyze
    from flywheel.ab.paired import analyze_paired, is_twin_table

    return analyze_paired(table, config) if is_twin_table(table) else analyze(table, config)


def served_arms(
    cache: PolicyCache,
    control: str,
    treatment: str,
    serving: ServingConfig,
    on_event: Callable[[ServingEvent], None],
) -> dict[str, Policy]:
    """Both arms' POLICYs behind the fail-closed safety check (``sim.serving.serve``).

    The same POLICY on both arms (an A/A test) is one served object, so the traffic model
    answers both arms with one backend call per instant.
    """
    served = serve(cache.arm(control), serving, on_event=on_event)
    if treatment == control:
        return {CONTROL: served, TREATMENT: served}
    return {CONTROL: served, TREATMENT: serve(cache.arm(treatment), serving, on_event=on_event)}


def serving_event_counts(events: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Serving events per policy and kind: ``{policy: {kind: count}}``."""
    if events.empty:
        return {}
    counts = events.groupby(["policy", "kind"]).size()
    return {
        policy: {kind: int(n) for kind, n in group.droplevel(0).items()}
        for policy, group in counts.groupby(level=0)
    }


def serving_markdown(counts: Mapping[str, Mapping[str, int]]) -> str:
    """The serving events per policy and kind as a Markdown section of the report."""
    lines = [
        "## Serving (fail-closed safety check)\n",
        "Replies the check replaced by the fallback; `blocked` ones count as unsafe replies "
        "of the arm that wrote them.\n",
    ]
    if not counts:
        return "\n".join([*lines, "No reply was replaced.\n"])
    lines.append("| policy | events |\n|---|---|")
    for policy, kinds in counts.items():
        lines.append(f"| {policy} | {', '.join(f'{k} {n}' for k, n in kinds.items())} |")
    return "\n".join(lines) + "\n"


def simulation_summary(
    days: pd.DataFrame, scenario: ABScenario, config: Mapping[str, Any]
) -> dict[str, Any]:
    """Totals of the ``days`` table: what the simulation cost and how well it batched."""
    wall = float(days["wall_s"].sum())
    tokens = int(days["bot_tokens"].sum() + days["user_tokens"].sum())
    turns = int(days["turns"].sum())
    calls = int(days["bot_calls"].sum())
    return {
        "scenario": scenario.name,
        "control": config["control"],
        "treatment": config["treatment"],
        "seed": scenario.seed,
        "days": len(days),
        "pre_days": scenario.traffic.pre_days,
        "test_days": scenario.traffic.test_days,
        "users": scenario.traffic.n_users,
        "sessions": int(days["sessions"].sum()),
        "bot_replies": turns,
        "bot_calls": calls,
        "user_calls": int(days["user_calls"].sum()),
        "mean_bot_batch": turns / calls if calls else float("nan"),
        "max_bot_batch": int(days["max_bot_batch"].max()) if len(days) else 0,
        "bot_tokens": int(days["bot_tokens"].sum()),
        "user_tokens": int(days["user_tokens"].sum()),
        "user_fallbacks": fallback_totals(days),
        "simulated_wall_s": wall,
        "tokens_per_s": tokens / wall if wall else float("nan"),
        "replies_per_s": turns / wall if wall else float("nan"),
        "mean_active_users_per_day": float(np.mean(days["active_users"])) if len(days) else 0.0,
    }


def simulation_markdown(sim: Mapping[str, Any]) -> str:
    """The simulation figures as a Markdown section of the report."""
    return (
        "## Simulation\n\n"
        f"| | |\n|---|---|\n"
        f"| days (pre + test) | {sim['pre_days']} + {sim['test_days']} |\n"
        f"| users / mean active per day | {sim['users']} / "
        f"{sim['mean_active_users_per_day']:.1f} |\n"
        f"| sessions / bot replies | {sim['sessions']} / {sim['bot_replies']} |\n"
        f"| bot calls / mean batch / max batch | {sim['bot_calls']} / "
        f"{sim['mean_bot_batch']:.1f} / {sim['max_bot_batch']} |\n"
        f"| tokens (bot + user) | {sim['bot_tokens']} + {sim['user_tokens']} |\n"
        f"| simulated-user fallbacks | {fallback_text(sim['user_fallbacks'])} |\n"
        f"| simulated wall time | {sim['simulated_wall_s']:.0f} s "
        f"({sim['tokens_per_s']:.1f} tokens/s) |\n"
    )
