"""The generation loop of ``flywheel run SCENARIO --out RUN_DIR``.

Generation 0 is the scenario's base model serving simulated production traffic. Each
generation K = 1, 2, ... then runs these steps, in order, each recorded in the run store's
``steps`` table (``flywheel.ledger``) with its config, seed, inputs and outputs:

1. ``collect``        the deployed model serves ``collect.days`` days of production traffic
                      (experiment ``gen{K}-traffic``; the population drifted to generation K).
2. ``curate``         the logged turns become training examples: PII scrubbed, unsafe /
                      reported / violating replies dropped, deduplicated, split by user
                      (``training.curation``) -> ``artifacts/gen{K}/data/``.
3. ``reward_models``  a naive and a style-controlled reward model are (re)trained on the
                      logs and evaluated against the oracle (``flywheel.rm_eval``) ->
                      ``artifacts/gen{K}/rm/``.
4. ``candidate:R``    each scenario recipe R makes a candidate from the deployed model
                      (``flywheel.candidates``) -> ``artifacts/gen{K}/models/R``.
5. ``offline:R``      offline evaluation and gates (``flywheel.gates``): reward-model win
                      rate, held-out steerability, style-artifact regression, safety and,
                      with ``gates.ifbench``, IFBench's prompts our checkers score.
6. ``ab``             the best candidate that passed every gate (highest style-controlled
                      win rate) meets the deployed model in a simulated A/B test (experiment
                      ``gen{K}-ab``), analysed by ``flywheel.ab`` -> ``artifacts/gen{K}/ab/``.
7. ``decide``         ship (the A/B says ship), hold (it does not) or gated (no candidate
                      passed the gates); the shipped model serves generation K+1.

Every bot reply in both traffic experiments is served through ``sim.serving``: a safety
check that fails closed; the replies it replaced are in the ``serving_events`` table.

Resume: steps are keyed by (generation, step name), their seeds derive from the scenario
seed, the generation and the step name, and their outputs are written atomically. Killing
the process at any point and running the same command again skips finished steps, restarts
the interrupted one (traffic resumes after its last committed day) and produces the same
results as an uninterrupted run.

``FLYWHEEL_FAULT`` (tests only) names a point where the process kills itself with SIGKILL:
``after:K:STEP`` once step STEP of generation K has been recorded, or ``day:EXPERIMENT:D``
once simulated day D of an experiment is committed.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import pandas as pd
from rich.console import Console

from flywheel.ledger import Ledger, derive_seed
from flywheel.persist import atomic_write_text
from flywheel.records import (
    CandidateSummary,
    GenerationRecord,
    OracleSummary,
    RecordError,
    read_records,
)
from flywheel.scenario import RecipeConfig, Scenario
from flywheel.steps import (
    ABOutput,
    ABStep,
    CuratedData,
    OfflineOutput,
    RewardModelEval,
    RewardModelName,
    RewardModels,
    Split,
    TrafficTotals,
    TrainedCandidate,
)
from flywheel.store import SCHEMA_VERSION, RunStore, fallback_totals
from policies import Policy, PolicySpec, SamplingParams, load_policy

if TYPE_CHECKING:
    from flywheel.gates import EvalSet
    from sim.characters import Character
    from sim.replay import GoldComparison

GEN0 = "gen0-base"
FAULT_ENV = "FLYWHEEL_FAULT"
_TRAFFIC_STREAM = 0x7AFF1C  # keeps traffic draws apart from the world's (same scenario seed)


class _StepOutput(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


Output = TypeVar("Output", bound=_StepOutput)


def experiment_ids(generation: int) -> tuple[str, str]:
    """(production-traffic experiment, A/B experiment) of a generation."""
    return f"gen{generation}-traffic", f"gen{generation}-ab"


def candidate_name(generation: int, recipe: str) -> str:
    """The label of generation ``generation``'s candidate made by ``recipe``."""
    return f"gen{generation}-{recipe}"


class PolicyPool:
    """Loads each model once (the same weights under two labels share one load)."""

    def __init__(self) -> None:
        self._loaded: dict[PolicySpec, Policy] = {}
        self._planted: dict[str, str] = {}

    def plant(self, model: str, planted: str) -> None:
        """Serve ``model`` inside the planted treatment ``planted`` (``sim.planted``, e.g.
        ``violate@0.5``) wherever it is asked for: offline gates and A/B alike."""
        self._planted[model] = planted

    def get(self, spec: PolicySpec) -> Policy:
        """The policy for ``spec`` (its ``name`` ignored for sharing)."""
        key = spec.model_copy(update={"name": None})
        if key not in self._loaded:
            planted = self._planted.get(key.model)
            if planted is None:
                self._loaded[key] = load_policy(key)
            else:
                from sim.planted import planted_policy

                self._loaded[key] = planted_policy(
                    f"{planted}:{key.model}", lambda _model: load_policy(key)
                )
        return self._loaded[key]

    def retain(self, specs: list[PolicySpec]) -> None:
        """Drop every loaded model not among ``specs`` (frees memory between generations)."""
        keep = {s.model_copy(update={"name": None}) for s in specs}
        self._loaded = {k: v for k, v in self._loaded.items() if k in keep}


@dataclass(frozen=True)
class Candidate:
    """One recipe's candidate of a generation: what the A/B choice and the decision read."""

    recipe: RecipeConfig
    trained: TrainedCandidate  # outputs of its candidate step
    offline: OfflineOutput  # outputs of its offline step

    @property
    def passed(self) -> bool:
        """Whether it passed every offline gate."""
        return self.offline.passed

    @property
    def style_controlled_win(self) -> float:
        """Its win rate over the deployed model under the style-controlled RM."""
        return self.offline.offline.rm_win_rate_style_controlled


class FlywheelRun:
    """Runs (or resumes) a scenario's generations into a run directory.

    Args:
        scenario: the validated scenario.
        run_dir: the run directory (created; an existing one is resumed).
        progress: progress bars and step lines on the console.
        after_step: called with (generation, step) after each recorded step (fault
            injection; ``FLYWHEEL_FAULT`` sets one up for subprocess tests).
        console: where step lines go (default: a rich console on stderr).
    """

    def __init__(
        self,
        scenario: Scenario,
        run_dir: str | Path,
        *,
        progress: bool = True,
        after_step: Callable[[int, str], None] | None = None,
        console: Console | None = None,
    ) -> None:
        self.scenario = scenario
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.console = console or Console(stderr=True, quiet=not progress)
        fault = os.environ.get(FAULT_ENV, "")
        self._fault_step = fault.removeprefix("after:") if fault.startswith("after:") else ""
        self._fault_day = fault.removeprefix("day:") if fault.startswith("day:") else ""
        self.after_step = after_step
        self.pool = PolicyPool()
        self._world_parts: dict[str, dict[str, Character]] = {}

    # ------------------------------------------------------------------ entry point
    def run(self) -> list[GenerationRecord]:
        """Run every generation not yet decided; return all generation records."""
        from flywheel.report import write_outputs

        with RunStore(self.run_dir) as store:
            self.store = store
            self.ledger = Ledger(store)
            self.ledger.bind_scenario(self.scenario.model_dump(mode="json"))
            deployed = self.base_spec()
            for generation in range(1, self.scenario.generations + 1):
                record = self.run_generation(generation, deployed)
                deployed = self.deployed_spec(record)
                write_outputs(self.run_dir, self.scenario, self.ledger.generations())
            records = self.ledger.generations()
        write_outputs(self.run_dir, self.scenario, records, plots=True)
        return read_records(records)

    # ------------------------------------------------------------------ policies
    def base_spec(self) -> PolicySpec:
        """The generation-0 deployment: the scenario's policy labelled ``gen0-base``."""
        return self.scenario.policy.model_copy(update={"name": GEN0})

    def candidate_spec(self, generation: int, recipe: str) -> PolicySpec:
        """The serving spec of a candidate checkpoint (same backend settings as the base);
        a recipe with ``planted`` set is served inside that planted treatment."""
        path = str((self.models_dir(generation) / recipe).resolve())
        planted = next((r.planted for r in self.scenario.recipes if r.name == recipe), None)
        if planted:
            self.pool.plant(path, planted)
        return self.scenario.policy.model_copy(
            update={"model": path, "name": candidate_name(generation, recipe)}
        )

    def deployed_spec(self, record: GenerationRecord) -> PolicySpec:
        """Who serves after a generation's decision."""
        if record.decision != "ship":
            return self._spec_by_name(record.parent)
        return self.candidate_spec(record.generation, record.recipe_name)

    def _spec_by_name(self, name: str) -> PolicySpec:
        if name == GEN0:
            return self.base_spec()
        generation, _, recipe = name.removeprefix("gen").partition("-")
        return self.candidate_spec(int(generation), recipe)

    # ------------------------------------------------------------------ folders
    def gen_dir(self, generation: int) -> Path:
        """``RUN_DIR/artifacts/gen{K}``."""
        return self.store.artifacts / f"gen{generation}"

    def models_dir(self, generation: int) -> Path:
        """Candidate checkpoints of a generation."""
        return self.run_dir / "artifacts" / f"gen{generation}" / "models"

    def rel(self, path: Path) -> str:
        """``path`` relative to the run directory (how outputs name files)."""
        return str(Path(path).resolve().relative_to(self.run_dir.resolve()))

    # ------------------------------------------------------------------ one generation
    def run_generation(self, generation: int, deployed: PolicySpec) -> GenerationRecord:
        """Every step of one generation (skipping finished ones); returns its record."""
        scenario = self.scenario
        traffic_id, _ = experiment_ids(generation)
        collect_traffic = scenario.collect_traffic(generation)
        self.console.rule(f"generation {generation}: deployed {deployed.label}")

        collect = self._step(
            generation,
            "collect",
            config={"traffic": collect_traffic.model_dump(mode="json")},
            inputs={"experiment_id": traffic_id, "policy": deployed.label},
            work=lambda seed: self.simulate(traffic_id, collect_traffic, deployed, deployed, seed),
            read=TrafficTotals.from_dict,
        )
        curate = self._step(
            generation,
            "curate",
            config={"curation": scenario.curation},
            inputs={"experiment_id": traffic_id},
            work=lambda seed: self.curate(generation, traffic_id, seed),
            read=CuratedData.from_dict,
        )
        rms = self._step(
            generation,
            "reward_models",
            config=scenario.reward_models.model_dump(mode="json"),
            inputs={"experiment_id": traffic_id},
            work=lambda seed: self.train_reward_models(generation, traffic_id, seed),
            read=RewardModels.from_dict,
        )

        candidates = [
            self._candidate(generation, recipe, deployed, curate, rms, traffic_id)
            for recipe in scenario.recipes
        ]

        # The A/B test goes to the candidate the honest (style-controlled) RM likes most.
        def by_win(candidate: Candidate) -> float:
            return candidate.style_controlled_win

        best = max((c for c in candidates if c.passed), key=by_win, default=None)
        ab = self._ab(generation, deployed, best)
        shown = best or max(candidates, key=by_win)
        record = self._step(
            generation,
            "decide",
            config={},
            inputs={"ab": ab.to_dict(), "candidate": candidate_name(generation, shown.recipe.name)},
            work=lambda seed: self.decide(
                generation,
                deployed=deployed,
                collect=collect,
                rms=rms,
                candidates=candidates,
                shown=shown,
                ab=ab,
            ),
            read=GenerationRecord.from_dict,
        )
        self.ledger.put_generation(generation, record.to_dict())
        self.pool.retain([self.deployed_spec(record), scenario.world.user_llm.policy])
        verdict = record.decision.upper()
        self.console.print(f"[bold]generation {generation}: {verdict}[/bold] {record.reason}")
        return record

    def _candidate(
        self,
        generation: int,
        recipe: RecipeConfig,
        deployed: PolicySpec,
        curate: CuratedData,
        rms: RewardModels,
        traffic_id: str,
    ) -> Candidate:
        """Train ``recipe``'s candidate, then evaluate it offline (two steps)."""
        scenario = self.scenario
        trained = self._step(
            generation,
            f"candidate:{recipe.name}",
            config=recipe.model_dump(mode="json"),
            inputs={
                "deployed": deployed.label,
                "data": curate.train,
                "reward_models": rms.to_dict(),
            },
            work=lambda seed: self.make_candidate(
                generation,
                recipe=recipe,
                deployed=deployed,
                curate=curate,
                rms=rms,
                experiment_id=traffic_id,
                seed=seed,
            ),
            read=TrainedCandidate.from_dict,
        )
        offline = self._step(
            generation,
            f"offline:{recipe.name}",
            config=scenario.gates.model_dump(mode="json"),
            inputs={"candidate": trained.model_path, "deployed": deployed.label},
            work=lambda seed: self.evaluate(
                generation, recipe=recipe.name, deployed=deployed, curate=curate, rms=rms, seed=seed
            ),
            read=OfflineOutput.from_dict,
        )
        return Candidate(recipe, trained, offline)

    def _ab(self, generation: int, deployed: PolicySpec, best: Candidate | None) -> ABStep:
        """The A/B step: ``best`` against the deployed model, skipped when no candidate passed
        its gates."""
        if best is None:
            return self._step(
                generation,
                "ab",
                config={"skipped": True},
                inputs={},
                work=lambda seed: ABStep(None),
                read=ABStep.from_dict,
            )
        _, ab_id = experiment_ids(generation)
        treatment = self.candidate_spec(generation, best.recipe.name)
        return self._step(
            generation,
            "ab",
            config={
                "traffic": self.scenario.ab_traffic(generation).model_dump(mode="json"),
                "analysis": self.scenario.analysis,
            },
            inputs={
                "experiment_id": ab_id,
                "control": deployed.label,
                "treatment": treatment.label,
            },
            work=lambda seed: ABStep(self.ab_test(generation, deployed, treatment, seed)),
            read=ABStep.from_dict,
        )

    def _step(
        self,
        generation: int,
        step: str,
        *,
        config: Mapping[str, Any],
        inputs: Mapping[str, Any],
        work: Callable[[int], Output],
        read: Callable[[Any], Output],
    ) -> Output:
        """Run one ledger step with its derived seed, then the fault hooks.

        ``work(seed)`` makes the step's record, which the ledger stores as its ``to_dict()``;
        the step returns ``read`` of the stored JSON, fresh or resumed alike.
        """
        seed = derive_seed(self.scenario.seed, generation, step)
        existing = self.ledger.step(generation, step)
        if existing is None or existing["status"] != "done":
            self.console.print(f"[cyan]gen {generation}[/cyan] {step} (seed {seed})")
        stored = self.ledger.run_step(
            generation, step, seed, config, inputs, lambda: work(seed).to_dict()
        )
        try:
            outputs = read(stored)
        except RecordError as error:
            raise RecordError(
                f"generation {generation}, step {step!r} of {self.run_dir}: {error}"
            ) from error
        if self.after_step is not None:
            self.after_step(generation, step)
        if self._fault_step == f"{generation}:{step}":
            os.kill(os.getpid(), signal.SIGKILL)
        return outputs

    # ------------------------------------------------------------------ traffic
    def world(self) -> Any:
        """A freshly built world (new latent user states) sharing the loaded user LLM."""
        from sim.traffic import CountingPolicy
        from sim.world import World

        user_llm = CountingPolicy(self.pool.get(self.scenario.world.user_llm.policy))
        world = World.build(self.scenario.world, seed=self.scenario.seed, user_policy=user_llm)
        return world, user_llm

    def served(self, spec: PolicySpec, experiment_id: str) -> Any:
        """``spec``'s model behind the fail-closed safety check, events to the ledger."""
        from sim.serving import serve

        return serve(
            self.pool.get(spec),
            self.scenario.serving,
            on_event=lambda event: self.ledger.record_serving_event(experiment_id, event.to_row()),
            name=spec.label,
        )

    def simulate(
        self,
        experiment_id: str,
        traffic: Any,
        control: PolicySpec,
        treatment: PolicySpec,
        seed: int,
    ) -> TrafficTotals:
        """Run (or resume) one traffic experiment into the store; return its totals."""
        from sim.traffic import CONTROL, TREATMENT, TrafficSimulator, drifted_population

        config = {
            "schema_version": SCHEMA_VERSION,
            "scenario": self.scenario.name,
            "seed": seed,
            "traffic": traffic.model_dump(mode="json"),
            "world": self.scenario.world.model_dump(mode="json"),
            "control": control.label,
            "treatment": treatment.label,
        }
        sink = self.store.open_sink(experiment_id, config)
        status = self.store.experiment_status(experiment_id)
        if status is None or not status.finished:
            world, user_llm = self.world()
            population = drifted_population(world.sampler, traffic, self.scenario.seed)
            # One served object for both arms when they are the same model: the traffic
            # model then answers both arms with one backend call per instant.
            served = self.served(control, experiment_id)
            same = treatment == control
            arms = {
                CONTROL: served,
                TREATMENT: served if same else self.served(treatment, experiment_id),
            }
            simulator = TrafficSimulator(
                world.engine,
                population.users,
                arms,
                traffic,
                seed=[seed, _TRAFFIC_STREAM],
                joined=population.joined,
                user_params=world.user_params,
                user_counter=user_llm,
                progress=self.progress,
            )
            simulator.run(sink, on_day_end=lambda day: self._day_fault(experiment_id, day))
        days = self.store.read_days(experiment_id)
        events = self.ledger.serving_events(experiment_id)
        return TrafficTotals(
            experiment_id=experiment_id,
            days=len(days),
            turns=int(days["turns"].sum()),
            sessions=int(days["sessions"].sum()),
            simulated_wall_s=float(days["wall_s"].sum()),
            serving_events=events["kind"].value_counts().to_dict() if len(events) else {},
            user_fallbacks=fallback_totals(days),
        )

    def _day_fault(self, experiment_id: str, day: int) -> None:
        if self._fault_day == f"{experiment_id}:{day}":
            os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------------ data and models
    def characters(self) -> dict[str, Character]:
        """The world's cast by name."""
        if "characters" not in self._world_parts:
            from sim.characters import load_characters, select_characters

            world = self.scenario.world
            cast = select_characters(load_characters(world.characters_dir), world.characters)
            self._world_parts["characters"] = cast
        return self._world_parts["characters"]

    def heldout_characters(self) -> dict[str, Character]:
        """The steerability benchmark's characters by name."""
        if "heldout" not in self._world_parts:
            from sim.characters import load_characters

            folder = self.scenario.gates.steerability.characters_dir
            self._world_parts["heldout"] = load_characters(folder)
        return self._world_parts["heldout"]

    def curate(self, generation: int, experiment_id: str, seed: int) -> CuratedData:
        """Curate an experiment's logged turns into train / held-out files."""
        from training.curation import curate

        turns = self.store.read_turns(experiment_id)
        prompts = {name: c.system_prompt() for name, c in self.characters().items()}
        data = curate(turns, np.random.default_rng(seed), self.scenario.curation_config(), prompts)
        folder = self.gen_dir(generation) / "data"
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for split, frame in (("train", data.train), ("held_out", data.held_out)):
            path = folder / f"{split}.jsonl"
            atomic_write_text(path, frame.to_json(orient="records", lines=True, force_ascii=False))
            paths[split] = self.rel(path)
        self.console.print(data.summary())
        leaked = pii_audit([data.train, data.held_out], self.scenario.curation_config().locale)
        if leaked:
            # Fail closed: nothing with personal data in it may reach a trainer.
            raise RuntimeError(
                f"privacy audit found {leaked} PII span(s) in the curated data of generation "
                f"{generation} after scrubbing; no training step runs on it. Inspect "
                f"{folder} and training.curation's detectors"
            )
        return CuratedData(
            train=paths["train"],
            held_out=paths["held_out"],
            n_input=data.n_input,
            n_train=len(data.train),
            n_held_out=len(data.held_out),
            dropped=data.dropped,
            pii_spans_scrubbed=data.n_pii_spans,
            pii_spans_after_scrubbing=leaked,
        )

    def read_split(self, curated: CuratedData, split: Split) -> pd.DataFrame:
        """A curated split written by ``curate``."""
        path = self.run_dir / curated.path(split)
        if path.stat().st_size == 0:
            return pd.DataFrame(columns=["prompt", "character", "completion", "user_id"])
        return pd.read_json(path, orient="records", lines=True)

    def train_reward_models(self, generation: int, experiment_id: str, seed: int) -> RewardModels:
        """A naive and a style-controlled reward model on the experiment's logs."""
        import json

        from flywheel.rm_eval import EVAL_FILE, train_and_evaluate

        config = self.scenario.reward_models
        turns = self.store.read_turns(experiment_id)
        user_days = self.store.read_user_days(experiment_id)
        activity = user_days.loc[user_days["active"].astype(bool), ["user_id", "day"]]
        fitted: dict[str, tuple[str, RewardModelEval]] = {}
        for label, controlled in (("naive", False), ("style_controlled", True)):
            model, report = train_and_evaluate(
                turns,
                comparisons=None,
                kind=config.kind,
                backbone=config.backbone,
                style_controlled=controlled,
                target=config.target,
                activity=activity,
                seed=seed,
                test_size=config.test_size,
                minilm_config=config.minilm_config(),
                llm_config=config.llm_config(),
                verbose=self.progress,
            )
            folder = self.gen_dir(generation) / "rm" / model.name
            staging = folder.parent / f".{folder.name}.partial"
            _remove(staging)
            model.save(staging)
            (staging / EVAL_FILE).write_text(json.dumps(report, indent=2, default=float))
            _remove(folder)
            staging.rename(folder)
            summary = RewardModelEval.from_report(report)
            fitted[label] = (self.rel(folder), summary)
            self.console.print(
                f"  reward model {model.name}: gold r = {summary.gold_pearson:.3f}, "
                f"max |style r| = {summary.max_abs_style_r:.3f}"
            )
        (naive, naive_eval), (controlled, controlled_eval) = (
            fitted["naive"],
            fitted["style_controlled"],
        )
        return RewardModels(
            naive=naive,
            naive_eval=naive_eval,
            style_controlled=controlled,
            style_controlled_eval=controlled_eval,
        )

    def reward_model(self, rms: RewardModels, which: RewardModelName) -> Any:
        """Load one of the generation's reward models ('naive' or 'style_controlled')."""
        from rewards.rm import load_reward_model

        return load_reward_model(self.run_dir / rms.path(which))

    def make_candidate(
        self,
        generation: int,
        *,
        recipe: RecipeConfig,
        deployed: PolicySpec,
        curate: CuratedData,
        rms: RewardModels,
        experiment_id: str,
        seed: int,
    ) -> TrainedCandidate:
        """Train one recipe's candidate (``flywheel.candidates``)."""
        from flywheel.candidates import train_candidate
        from training.rewards import StyleReference

        # The artifact penalty measures drift from what the deployed model actually served.
        turns = self.store.read_turns(experiment_id)
        reference = StyleReference.from_replies(list(turns["bot_reply"]), list(turns["character"]))
        reward_model = (
            None if recipe.reward_model == "none" else self.reward_model(rms, recipe.reward_model)
        )
        out_dir = self.models_dir(generation) / recipe.name
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        training = train_candidate(
            recipe,
            base_model=deployed.model,
            deployed=self.pool.get(deployed),
            train=self.read_split(curate, "train"),
            reference=reference,
            checkers={n: c.checkers for n, c in self.characters().items()},
            reward_model=reward_model,
            out_dir=out_dir,
            seed=seed,
            sampling=self.scenario.traffic.bot_sampling.params(seed),
            world=self.world()[0] if recipe.kind == "grpo_multiturn" else None,
        )
        return TrainedCandidate(model_path=self.rel(out_dir), training=training)

    def evaluate(
        self,
        generation: int,
        *,
        recipe: str,
        deployed: PolicySpec,
        curate: CuratedData,
        rms: RewardModels,
        seed: int,
    ) -> OfflineOutput:
        """Offline evaluation and gates of one candidate against the deployed model."""
        from flywheel.gates import (
            apply_gates,
            evaluate_offline,
            logged_eval_set,
            steerability_eval_set,
        )
        from rewards.safety import SafetyChecker
        from sim.chitchat import load_chitchat

        gates = self.scenario.gates
        rng = np.random.default_rng(seed)
        logged = logged_eval_set(self.read_split(curate, "held_out"), gates.eval_prompts, rng)
        chitchat = self.scenario.world.chitchat
        openers = load_chitchat(chitchat.heldout_fraction, chitchat.split_seed).openers("heldout")
        bench = steerability_eval_set(
            self.heldout_characters(), openers, gates.steerability.prompts_per_character, rng
        )
        sampling = self.scenario.traffic.bot_sampling
        params = SamplingParams(
            max_new_tokens=gates.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=seed,
        )
        serving = self.scenario.serving
        report = evaluate_offline(
            candidate=self.pool.get(self.candidate_spec(generation, recipe)),
            deployed=self.pool.get(deployed),
            logged=logged,
            benchmark=bench,
            world_characters=self.characters(),
            heldout_characters=self.heldout_characters(),
            naive_rm=self.reward_model(rms, "naive"),
            style_rm=self.reward_model(rms, "style_controlled"),
            safety_checker=SafetyChecker(serving.categories, serving.offensive_threshold),
            params=params,
            config=gates,
        )
        verdicts = apply_gates(report, gates)
        oracle = self.gold_vs_parent(generation, logged, report.replies)
        folder = self.gen_dir(generation) / "offline"
        folder.mkdir(parents=True, exist_ok=True)
        replies = folder / f"{recipe}_replies.jsonl"
        atomic_write_text(
            replies, report.replies.to_json(orient="records", lines=True, force_ascii=False)
        )
        ifbench_replies = None
        if report.ifbench is not None:
            ifbench = folder / f"{recipe}_ifbench.jsonl"
            atomic_write_text(
                ifbench, report.ifbench.to_json(orient="records", lines=True, force_ascii=False)
            )
            ifbench_replies = self.rel(ifbench)
        self.console.print(report.style_regression.summary())
        for gate in verdicts:
            shown = "pass" if gate.passed else gate.verdict.upper()
            self.console.print(f"  gate {gate.name}: {shown}: {gate.reason}")
        return OfflineOutput(
            offline=report.summary(),
            oracle=None if oracle is None else OracleSummary(gold=asdict(oracle)),
            gates=tuple(verdicts),
            replies=self.rel(replies),
            ifbench_replies=ifbench_replies,
        )

    def gold_vs_parent(
        self, generation: int, logged: EvalSet, replies: pd.DataFrame
    ) -> GoldComparison | None:
        """The ORACLE's view of the offline evaluation (shown, never decided on): gold
        utility of the candidate's and the deployed model's replies to the held-out logged
        contexts, for the users who wrote them (``sim.replay.compare_gold``)."""
        from sim.replay import GoldReplay, compare_gold

        if logged.moments is None:
            return None
        traffic_id, _ = experiment_ids(generation)
        replay = GoldReplay(
            self.store.read_users(),
            self.store.read_turns(traffic_id),
            self.characters(),
            self.scenario.world.gold,
        )
        contexts = logged.moments.assign(prompt=logged.chats, character=logged.characters)
        on_logged = replies[replies["set"] == "logged"]
        return compare_gold(
            replay, contexts, list(on_logged["candidate"]), list(on_logged["deployed"])
        )

    # ------------------------------------------------------------------ A/B and decision
    def ab_test(
        self, generation: int, control: PolicySpec, treatment: PolicySpec, seed: int
    ) -> ABOutput:
        """Simulate and analyse the A/B test; write its report under ``artifacts/gen{K}/ab``."""
        from flywheel.ab_report import write_report
        from flywheel.experiment import analyze_experiment

        _, ab_id = experiment_ids(generation)
        traffic = self.scenario.ab_traffic(generation)
        simulation = self.simulate(ab_id, traffic, control, treatment, seed)
        table = self.store.analysis_table(ab_id)
        result = analyze_experiment(table, self.scenario.analysis_config())
        self.store.write_analysis(ab_id, "ab", result.to_dict())
        folder = self.gen_dir(generation) / "ab"
        paths = write_report(
            result,
            table,
            folder,
            title=f"gen {generation} A/B: {treatment.label} vs {control.label}",
        )
        self.console.print(result.summary())
        summary = result.to_dict()
        return ABOutput(
            experiment_id=ab_id,
            metrics=summary["metrics"],
            # a twin test has no sample ratio to check; its standard view has
            srm_p_value=summary.get("srm_p_value", summary.get("standard", {}).get("srm_p_value")),
            decision=summary["decision"],
            reason=summary["reason"],
            simulation=simulation,
            files={k: self.rel(v) for k, v in paths.items()},
        )

    def decide(
        self,
        generation: int,
        *,
        deployed: PolicySpec,
        collect: TrafficTotals,
        rms: RewardModels,
        candidates: list[Candidate],
        shown: Candidate,
        ab: ABStep,
    ) -> GenerationRecord:
        """The generation record (one entry of ``generations.json``): ship or hold as the
        A/B test says, gated when no candidate passed its gates (no A/B test ran)."""
        from flywheel.gates import failed_reason

        candidate = candidate_name(generation, shown.recipe.name)
        if ab.result is None:
            decision = "gated"
            reasons = [
                f"{candidate_name(generation, c.recipe.name)}: {failed_reason(c.offline.gates)}"
                for c in candidates
            ]
            reason = "no candidate passed the offline gates; " + " | ".join(reasons)
        else:
            decision = "ship" if ab.result.decision == "ship" else "hold"
            reason = f"A/B {ab.result.decision}: {ab.result.reason}"
        traffic_id, ab_id = experiment_ids(generation)
        return GenerationRecord(
            generation=generation,
            parent=deployed.label,
            candidate=candidate,
            recipe=shown.recipe.kind,
            recipe_name=shown.recipe.name,
            model_path=shown.trained.model_path,
            traffic_experiment_id=traffic_id,
            ab_experiment_id=None if ab.result is None else ab_id,
            offline=shown.offline.offline.to_dict(),
            oracle=shown.offline.oracle,
            gates=shown.offline.gate_records(),
            ab=None if ab.result is None else ab.result.summary(),
            decision=decision,
            reason=reason,
            deployed_after=candidate if decision == "ship" else deployed.label,
            candidates=tuple(
                CandidateSummary(
                    candidate=candidate_name(generation, c.recipe.name),
                    recipe=c.recipe.kind,
                    model_path=c.trained.model_path,
                    passed_gates=c.passed,
                    gates=c.offline.gate_records(),
                    rm_win_rate=c.offline.offline.rm_win_rate,
                    rm_win_rate_style_controlled=c.style_controlled_win,
                )
                for c in candidates
            ),
            reward_models=rms.to_dict(),
            traffic=collect.summary(),
        )


def pii_audit(frames: list[pd.DataFrame], locale: str) -> int:
    """PII spans still present in curated examples (prompt messages and completions),
    found with the same detectors curation scrubs with; 0 when the scrub held."""
    from training.curation import make_scrubber

    scrubber = make_scrubber(locale)
    found = 0
    for frame in frames:
        for prompt, completion in zip(
            frame.get("prompt", []), frame.get("completion", []), strict=True
        ):
            texts = [m["content"] for m in prompt if m["role"] != "system"] + [str(completion)]
            found += sum(len(list(scrubber.iter_filth(t))) for t in texts)
    return found


def _remove(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


def run_scenario(
    scenario_path: str | Path, out: str | Path, *, progress: bool = True
) -> list[GenerationRecord]:
    """What ``flywheel run`` does: load the scenario and run (or resume) it into ``out``."""
    from flywheel.scenario import load_scenario

    return FlywheelRun(load_scenario(scenario_path), out, progress=progress).run()
