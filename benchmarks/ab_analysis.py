"""Benchmark the A/B analysis: time per table size and A/A re-randomisation throughput.

Prints, for synthetic user-day tables (``flywheel.ab.synthetic``, 7 pre-period + 7 test days):

1. the wall time to aggregate the long table per user and to run the full analysis (6 metrics,
   CUPED, SRM, MDE, corrections, decision), for each size, and the CPU time of both (the
   fairer figure on a shared machine);
2. A/A throughput (re-randomisations per second) of the vectorised ``aa_test`` next to two
   baselines measured in the same run on the same table: a per-replicate pandas loop (permute
   the arm column, run ``analyze`` on the DataFrame) and a per-replicate loop of the same
   per-metric tests on the pre-aggregated users (``compare`` per metric, no SRM / MDE /
   correction: the fair baseline, since statsmodels' Holm correction alone runs a full
   ``gc.collect()`` per call).

Usage::

    .venv/bin/python benchmarks/ab_analysis.py                 # 10k and 100k users
    .venv/bin/python benchmarks/ab_analysis.py --sizes 1000000  # 1M users x 14 days (~3 GB)
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import pandas as pd

from flywheel import ab
from flywheel.ab.synthetic import synthetic_user_days
from flywheel.metrics import UserTable, aggregate_users, user_metrics

LIFTS = {"breadth": 0.02, "depth": 0.03, "violation_rate": 0.1}


def time_analysis(n_users: int, seed: int) -> dict[str, float]:
    """Seconds to aggregate and to analyse a table of ``n_users`` x 14 days."""
    table = synthetic_user_days(n_users, np.random.default_rng(seed), lifts=LIFTS)
    start, cpu = time.perf_counter(), time.process_time()
    users = aggregate_users(table)
    aggregated = time.perf_counter()
    result = ab.analyze(users)
    done = time.perf_counter()
    return {
        "cpu_s": time.process_time() - cpu,
        "users": n_users,
        "rows": len(table),
        "aggregate_s": aggregated - start,
        "analyze_s": done - aggregated,
        "total_s": done - start,
        "decision": result.decision,
    }


def naive_pandas_aa(table: pd.DataFrame, n: int, rng: np.random.Generator) -> float:
    """Replicates per second of a per-replicate loop over DataFrames."""
    arms = table.groupby("user_id")["arm"].first()
    start = time.perf_counter()
    for _ in range(n):
        shuffled = pd.Series(rng.permutation(arms.to_numpy()), index=arms.index)
        ab.analyze(table.assign(arm=table["user_id"].map(shuffled)))
    return n / (time.perf_counter() - start)


def loop_tests_aa(users: UserTable, n: int, rng: np.random.Generator) -> float:
    """Replicates per second of a per-replicate loop of the same per-metric tests only."""
    metrics = user_metrics(users)
    start = time.perf_counter()
    for _ in range(n):
        treatment = rng.permutation(users.treatment)
        for metric in metrics:
            ab.compare(metric, treatment)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--aa-users", type=int, default=5000)
    parser.add_argument("--aa-replicates", type=int, default=2000)
    parser.add_argument("--baseline-replicates", type=int, default=20)
    parser.add_argument("--loop-replicates", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")

    print("\nanalysis time (synthetic tables, 7 pre-period + 7 test days)")
    print(
        f"{'users':>10}{'rows':>12}{'aggregate s':>13}{'analyze s':>11}{'total s':>9}"
        f"{'CPU s':>8}  decision"
    )
    for n_users in args.sizes:
        r = time_analysis(n_users, args.seed)
        print(
            f"{r['users']:>10,}{r['rows']:>12,}{r['aggregate_s']:>13.2f}{r['analyze_s']:>11.2f}"
            f"{r['total_s']:>9.2f}{r['cpu_s']:>8.2f}  {r['decision']}"
        )

    table = synthetic_user_days(args.aa_users, np.random.default_rng(args.seed), lifts=LIFTS)
    users = aggregate_users(table)
    start = time.perf_counter()
    result = ab.aa_test(users, args.aa_replicates, seed=args.seed)
    vectorised = args.aa_replicates / (time.perf_counter() - start)
    rng = np.random.default_rng(args.seed)
    naive = naive_pandas_aa(table, args.baseline_replicates, rng)
    looped = loop_tests_aa(users, args.loop_replicates, rng)
    print(f"\nA/A on {args.aa_users:,} users ({len(table):,} rows), 6 metrics with CUPED")
    print(f"  vectorised aa_test:            {vectorised:10.1f} re-randomisations/s "
          f"({args.aa_replicates} replicates)")  # fmt: skip
    print(f"  per-replicate pandas loop:     {naive:10.1f} re-randomisations/s "
          f"({args.baseline_replicates} replicates)  -> speed-up x{vectorised / naive:,.0f}")  # fmt: skip
    print(f"  per-replicate loop of tests:   {looped:10.1f} re-randomisations/s "
          f"({args.loop_replicates} replicates)  -> speed-up x{vectorised / looped:,.1f}")  # fmt: skip
    worst = max(result.metrics, key=lambda m: abs(m.false_positive_rate - result.alpha))
    print(
        f"  calibration: FPR {min(m.false_positive_rate for m in result.metrics):.3f}-"
        f"{max(m.false_positive_rate for m in result.metrics):.3f} at alpha {result.alpha}, "
        f"min KS p {min(m.ks_p_value for m in result.metrics):.3g} (furthest: {worst.name})"
    )


if __name__ == "__main__":
    main()
