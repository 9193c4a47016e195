"""Counterfactual twins on the real simulator: A/A calibration, and twin vs standard precision.

``benchmarks/twins_aa.py`` checks the paired statistics on synthetic tables; this runs the
traffic model itself (``sim.traffic``, ``design = "twins"``) with a real model writing both
the bot replies and the users' messages. ``--groups`` experiments of ``--users`` users each
are simulated together in one population (big batches: far cheaper than one run each) and
analysed apart; their users share nothing but the backend calls their replies came from.

- **A/A** (``--treatment`` left out: the same model serves both lives, its sampling seeds
  independent per call): the share of experiments whose paired test finds p < alpha on
  breadth and on depth, with a 95% Clopper-Pearson interval. A calibrated test gives alpha.
- **A treatment** (``--treatment violate@0.3:MODEL`` or any POLICY): per experiment the
  twin CI of the lift on breadth and depth, the standard view's CI (CUPED, the users in
  their hashed arms: what production would see of the same run), the generated tokens each
  design spent, and the width ratio at equal tokens (``sqrt`` of the variance ratio of
  ``flywheel.ab.paired``).

Usage::

    .venv/bin/python benchmarks/twins_sim.py --model tiny --groups 200 --json runs/twins_sim/aa_tiny.json
    .venv/bin/python benchmarks/twins_sim.py --model smollm2 --groups 5 --users 40 \\
        --json runs/twins_sim/aa_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pandas as pd
from scipy import stats
from tqdm.auto import tqdm
from traffic import tiny_llama

from flywheel.ab import AnalysisConfig
from flywheel.ab.paired import analyze_paired
from flywheel.experiment import PolicyCache
from flywheel.store import RunStore
from policies import Policy, PolicySpec
from policies.hardware import machine_summary
from sim.traffic import SamplingConfig, TrafficConfig, TrafficSimulator
from sim.world import World, WorldConfig

METRICS = ("breadth", "depth")


def twin_tests(args: argparse.Namespace, world: World, arms: dict[str, Policy], seed: int,
               run_dir: Path) -> list[dict[str, dict[str, float]]]:  # fmt: skip
    """``--groups`` twin experiments of ``--users`` each, simulated together in one run of
    ``seed`` on fresh users of ``world`` (one population, big batches) and analysed apart:
    users share nothing but the batches their replies were generated in."""
    n_users = args.users * args.groups
    traffic = TrafficConfig(
        n_users=n_users, pre_days=args.pre_days, test_days=args.test_days,
        treatment_share=0.5, design="twins", salt=f"twins-{seed}",
        bot_sampling=SamplingConfig(max_new_tokens=args.max_new_tokens),
    )  # fmt: skip
    users = world.sampler.sample(n_users)  # the sampler moves on: each run new users
    group = {u.user_id: i // args.users for i, u in enumerate(users)}
    simulator = TrafficSimulator(
        world.engine, users, arms, traffic, seed=seed, user_params=world.user_params,
        progress=True,
    )  # fmt: skip
    with RunStore(run_dir) as store:
        simulator.run(store.open_sink("ab", {"seed": seed}))
        table = store.analysis_table("ab")
    groups = table["user_id"].map(group)
    results = []
    for g in range(args.groups):
        try:
            results.append(analysed(args, table[groups == g]))
        except ValueError as err:  # e.g. the hash split left an arm under 2 users
            print(f"experiment {g} of run {seed} skipped: {err}")
    return results


def analysed(args: argparse.Namespace, table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """One twin experiment's paired and standard-view figures per metric."""
    result = analyze_paired(table, AnalysisConfig(alpha=args.alpha))
    out = {}
    for name in METRICS:
        m, s = result[name], result.standard[name]
        out[name] = {
            "lift": m.lift,
            "p_value": m.p_value,
            "twin_ci": [m.ci_low, m.ci_high],
            "standard_ci": [s.ci_low, s.ci_high],
            "twin_width": m.ci_high - m.ci_low,
            "standard_width": s.ci_high - s.ci_low,
            "variance_ratio": m.variance_ratio,
            "width_ratio_equal_tokens": math.sqrt(m.variance_ratio),
        }
    out["cost"] = {"twin_tokens": result.cost_twin, "standard_tokens": result.cost_standard}
    return out


def summarise(runs: list[dict], alpha: float) -> dict[str, dict[str, float]]:
    """Per metric: the share of p < alpha with its CI, and the mean widths and ratios."""
    summary = {}
    for name in METRICS:
        rows = [r[name] for r in runs]
        hits = sum(r["p_value"] < alpha for r in rows)
        ci = stats.binomtest(hits, len(rows)).proportion_ci(0.95)
        summary[name] = {
            "significant_share": hits / len(rows),
            "significant_ci": [ci.low, ci.high],
            "mean_twin_width": sum(r["twin_width"] for r in rows) / len(rows),
            "mean_standard_width": sum(r["standard_width"] for r in rows) / len(rows),
            "mean_width_ratio_equal_tokens": sum(r["width_ratio_equal_tokens"] for r in rows)
            / len(rows),
        }
    return summary


def main() -> None:
    """Run the repetitions, print a table, and write ``--json`` if asked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny', 'smollm2' or an HF folder")
    parser.add_argument("--treatment", help="treatment POLICY; 'MODEL' stands for --model's "
                        "path; default: the control itself (A/A)")  # fmt: skip
    parser.add_argument("--reps", type=int, default=1, help="simulated runs (seeds)")
    parser.add_argument("--groups", type=int, default=200,
                        help="independent twin experiments per run (disjoint users)")  # fmt: skip
    parser.add_argument("--users", type=int, default=16, help="users per experiment")
    parser.add_argument("--pre-days", type=int, default=1)
    parser.add_argument("--test-days", type=int, default=2)
    parser.add_argument("--turn-cap", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="first repetition's seed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        model = str(tiny_llama(tmp_dir / "tiny")) if args.model == "tiny" else args.model
        cache = PolicyCache()
        spec = PolicySpec(model=model, dtype="float32" if args.model == "tiny" else "auto")
        control = cache.get(spec)
        treatment = cache.arm(args.treatment.replace("MODEL", model)) if args.treatment else control
        world_config = WorldConfig.model_validate(
            {"turn_cap": args.turn_cap,
             "user_llm": {"max_new_tokens": args.max_new_tokens, "policy": spec.model_dump()}}
        )  # fmt: skip
        world = World.build(world_config, seed=args.seed, user_policy=control)
        arms = {"control": control, "treatment": treatment}
        runs = []
        for rep in tqdm(range(args.reps), desc="simulated runs"):
            seed = args.seed + rep
            runs += twin_tests(args, world, arms, seed, tmp_dir / f"run{seed}")
    summary = summarise(runs, args.alpha)
    kind = f"treatment {args.treatment}" if args.treatment else "A/A"
    print(f"{machine_summary()}\nmodel {args.model}, {kind}, {len(runs)} twin experiments of "
          f"{args.users} users, {args.pre_days} + {args.test_days} days")  # fmt: skip
    print(
        "| metric | p < alpha | 95% CI | twin CI width | standard CI width | width ratio at equal tokens |"
    )
    print("|---|---:|---|---:|---:|---:|")
    for name, s in summary.items():
        low, high = s["significant_ci"]
        print(f"| {name} | {s['significant_share']:.3f} | [{low:.3f}, {high:.3f}] "
              f"| {s['mean_twin_width']:.4f} | {s['mean_standard_width']:.4f} "
              f"| {s['mean_width_ratio_equal_tokens']:.2f} |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {"machine": machine_summary(), "args": vars(args), "summary": summary,
                    "runs": runs}  # fmt: skip
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
