"""Reward models on the artifact trap: does style control remove the emoji / length bias?

Three stages, each skipped when its output already exists in RUN_DIR (rerun to resume):

1. Traffic. The artifact-trap world (``scenarios/world_artifact_trap.toml``: emoji and long
   replies earn likes today, fatigue and length misfit cost satisfaction later) is served by
   the packaged SmolLM2 wrapped in ``sim.planted.StyleVariationPolicy``, which plants style
   variation the 135M model rarely produces by itself: a share of replies get 1-4 emoji
   appended, another share a friendly filler sentence. The variation is independent of the
   reply's content, so whatever a reward model learns about it is learned from the users'
   reactions alone. ``sim.traffic`` runs the days into the run store at RUN_DIR (A/A: the
   same policy in both arms).
2. Comparisons. Logged turns are paired with an alternative reply from the same policy for
   the same conversation state (one batched call), and simulated annotators
   (``sim.annotators``: users of the population, gold utility + Bradley-Terry noise) label
   them into ``RUN_DIR/artifacts/comparisons.parquet``.
3. Reward models. ``flywheel.rm_eval.rm_train`` (what ``flywheel rm train`` runs) for each
   requested kind x backbone, naive and style-controlled; prints held-out pairwise accuracy,
   gold correlation, the correlation with emoji count and length, and training time.
   ``pointwise:liked`` is a pointwise model of likes alone, the immediate signal the trap
   rewards.

    .venv/bin/python benchmarks/rm_artifact_trap.py --run-dir runs/rm_artifact_trap

Figures and how to read them: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from policies.base import Policy, SamplingParams
from sim.planted import StyleVariationPolicy

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "world_artifact_trap.toml"


def run_traffic(
    run_dir: Path,
    n_users: int,
    pre_days: int,
    test_days: int,
    turn_cap: int,
    slot_minutes: int,
    seed: int,
):
    """Stage 1: the artifact-trap world's traffic into RUN_DIR's store. Returns the world,
    the bot policy and the final users (with their latent states)."""
    from flywheel.store import RunStore
    from sim.traffic import SamplingConfig, TrafficConfig, TrafficSimulator
    from sim.world import World, load_world_config

    world_config = load_world_config(SCENARIO).model_copy(update={"turn_cap": turn_cap})
    world = World.build(world_config, seed=seed)
    bot = StyleVariationPolicy(world.user_simulator.policy)
    users = world.sampler.sample(n_users)
    config = TrafficConfig(
        n_users=n_users, pre_days=pre_days, test_days=test_days, treatment_share=0.5,
        salt="rm-artifact-trap", slot_minutes=slot_minutes,
        bot_sampling=SamplingConfig(max_new_tokens=48),
    )  # fmt: skip
    simulator = TrafficSimulator(
        world.engine,
        users,
        {"control": bot, "treatment": bot},
        config,
        seed=seed,
        user_params=world.user_params,
    )
    experiment = {
        "scenario": str(SCENARIO.name),
        # The world, as `flywheel run` records it: `flywheel bon` / `train` read it back.
        "world": world_config.model_dump(mode="json"),
        "policy": bot.name,
        "seed": seed,
        "traffic": config.model_dump(mode="json"),
    }
    started = time.perf_counter()
    with RunStore(run_dir) as store:
        state = simulator.run(store.open_sink("traffic", experiment))
    print(f"traffic: {time.perf_counter() - started:.0f}s, {simulator.stats.as_row()}", flush=True)
    return world, bot, state.users


def run_annotators(run_dir: Path, world, bot: Policy, panel, n_pairs: int, seed: int) -> None:
    """Stage 2: pairs from logged turns, labelled by simulated annotators."""
    from flywheel.rm_eval import write_comparisons
    from flywheel.store import RunStore
    from sim.annotators import (
        AnnotatorConfig,
        SimulatedAnnotators,
        comparisons_frame,
        pairs_from_turns,
    )

    rng = np.random.default_rng(seed + 1)
    with RunStore(run_dir, read_only=True) as store:
        turns = store.read_turns()
    started = time.perf_counter()
    pairs = []
    # Chunks keep one generate call's memory bounded; each chunk is still ONE batched call.
    for chunk in np.array_split(rng.permutation(len(turns))[:n_pairs], max(1, n_pairs // 256)):
        params = SamplingParams(
            max_new_tokens=48, temperature=0.8, top_p=0.95, seed=int(rng.integers(2**31))
        )
        pairs += pairs_from_turns(turns.iloc[np.sort(chunk)], world.characters, bot, params, rng)
        total = min(n_pairs, len(turns))  # one pair per logged turn at most
        print(f"  pairs {len(pairs)}/{total} ({time.perf_counter() - started:.0f}s)", flush=True)
    annotators = SimulatedAnnotators(
        world.gold,
        world.characters,
        panel,
        world.engine.embedder,
        AnnotatorConfig(noise=0.5, disagreement=0.2),
    )
    frame = comparisons_frame(annotators.label(pairs, rng))
    write_comparisons(run_dir, frame)
    print(
        f"annotators: {len(frame)} comparisons in {time.perf_counter() - started:.0f}s", flush=True
    )


def train_models(
    run_dir: Path,
    kinds: list[str],
    backbones: list[str],
    llm_max_pairs: int,
    llm_eval_rows: int,
    folds: int,
    seed: int,
) -> list[dict]:
    """Stage 3: naive and style-controlled models for every kind x backbone.

    MiniLM models are cross-validated over ``folds`` user folds (cheap, and every logged
    pair is then held out once); LLM models get the one split ``flywheel rm train`` makes,
    with the model saved under RUN_DIR/artifacts/rm/.
    """
    from flywheel.rm_eval import cross_validate, load_run_tables, rm_train, summarize
    from rewards.rm import LLMConfig

    turns, activity, comparisons = load_run_tables(run_dir)
    rows = []
    for backbone in backbones:
        for spec in kinds:
            kind, _, target = spec.partition(":")  # "pointwise:liked" = a likes model
            for controlled in (False, True):
                if backbone == "minilm" and folds > 1:
                    result = cross_validate(
                        turns, comparisons, kind, backbone, folds=folds, seed=seed,
                        style_controlled=controlled, target=target or None, activity=activity,
                    )  # fmt: skip
                    rows.append(result["pooled"])
                else:
                    _, report = rm_train(
                        run_dir, kind, backbone, style_controlled=controlled, seed=seed,
                        target=target or None, llm_config=LLMConfig(max_pairs=llm_max_pairs),
                        max_eval_rows=llm_eval_rows, verbose=False,
                    )  # fmt: skip
                    print(summarize(report), flush=True)
                    rows.append(_as_row(report))
                print(table(rows[-1:]), flush=True)
    return rows


def _as_row(report: dict) -> dict:
    """One split's report in the pooled layout of ``cross_validate``."""
    return {
        "model": report["model"],
        "folds": 1,
        "train_seconds_mean": report["train_seconds"],
        "gold_pearson_turns": report["gold_correlation"]["turns"]["pearson_r"],
        "style_pearson": {k: v["pearson_r"] for k, v in report["style_correlations"].items()},
        "style_sensitivity_sd": {
            k: v["mean_delta_sd"] for k, v in report["style_sensitivity"].items()
        },
        "n_turns": report["n_test_turns"],
        "pairwise_accuracy": report.get("pairwise_accuracy", {}),
        "gold_pairs_agreement": report["gold_correlation"].get("pairs_agreement", float("nan")),
    }


def table(rows: list[dict]) -> str:
    """The figures side by side, as Markdown."""
    nan = float("nan")
    lines = [
        "| model | folds | train s | pairwise acc [95% CI] (n) | gold r | gold agree "
        "| r(emoji) | r(length) | +emoji (sd) | +filler (sd) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = r.get("pairwise_accuracy") or {}
        style, sens = r["style_pearson"], r["style_sensitivity_sd"]
        lines.append(
            f"| {r['model']} | {r['folds']} | {r['train_seconds_mean']:.0f} "
            f"| {acc.get('accuracy', nan):.3f} [{acc.get('ci_low', nan):.3f}, "
            f"{acc.get('ci_high', nan):.3f}] ({acc.get('n', 0)}) "
            f"| {r['gold_pearson_turns']:+.3f} | {r.get('gold_pairs_agreement', nan):.3f} "
            f"| {style['emoji']:+.3f} | {style['length']:+.3f} "
            f"| {sens['emoji']:+.2f} | {sens['filler']:+.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/rm_artifact_trap"))
    parser.add_argument("--users", type=int, default=160)
    parser.add_argument("--pre-days", type=int, default=1)
    parser.add_argument("--test-days", type=int, default=3)
    parser.add_argument("--turn-cap", type=int, default=4)
    parser.add_argument(
        "--slot-minutes",
        type=int,
        default=720,
        help="arrival slot: wide slots batch more conversations into one generate call",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; on a shared, oversubscribed CPU one thread was 6x faster than two",
    )
    parser.add_argument("--pairs", type=int, default=1500)
    parser.add_argument(
        "--kinds",
        default="pointwise,pointwise:liked,pairwise,signals",
        help="kinds to train; KIND:TARGET picks a pointwise target (pointwise:liked)",
    )
    parser.add_argument("--backbones", default="minilm,llm")
    parser.add_argument("--llm-max-pairs", type=int, default=600)
    parser.add_argument(
        "--llm-eval-rows",
        type=int,
        default=300,
        help="LLM backbone: held-out turns and pairs scored (each a random sample)",
    )
    parser.add_argument("--folds", type=int, default=5, help="MiniLM: user folds (1 = one split)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    from flywheel.rm_eval import comparisons_path
    from flywheel.store import DB_FILE

    if not (args.run_dir / DB_FILE).exists() or not comparisons_path(args.run_dir).exists():
        world, bot, users = run_traffic(
            args.run_dir, args.users, args.pre_days, args.test_days, args.turn_cap,
            args.slot_minutes, args.seed,
        )  # fmt: skip
        if not comparisons_path(args.run_dir).exists():
            run_annotators(args.run_dir, world, bot, users, args.pairs, args.seed)
    reports = train_models(
        args.run_dir,
        args.kinds.split(","),
        args.backbones.split(","),
        args.llm_max_pairs,
        args.llm_eval_rows,
        args.folds,
        args.seed,
    )
    print(table(reports))
    out = (
        args.run_dir / "artifacts" / f"rm_artifact_trap_{'-'.join(args.backbones.split(','))}.json"
    )
    out.write_text(json.dumps(reports, indent=2, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
