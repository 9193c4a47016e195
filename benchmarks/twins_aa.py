"""Benchmark counterfactual twins on synthetic tables: A/A false-positive rate and CI width.

For each repetition it draws a synthetic twin table (``flywheel.ab.synthetic``: common random
numbers shared by the two lives with probability ``--coupling``), and measures, per metric:

1. A/A (same policy in both lives): the share of tables where the paired test says p < alpha
   (should be alpha), with its 95% Clopper-Pearson interval;
2. planted lift (``--lift`` on breadth and depth): the mean width of the twin lift CI and of
   the standard design's CI (``flywheel.ab.analyze`` with CUPED on the standard view, same
   table), their ratio, and the mean variance ratio at equal generated tokens
   (``flywheel.ab.paired``).

Usage::

    .venv/bin/python benchmarks/twins_aa.py --reps 200 --json runs/twins_aa/result.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from flywheel import ab
from flywheel.ab.paired import life_views, paired_compare
from flywheel.ab.synthetic import synthetic_twin_days
from flywheel.metrics import aggregate_users, user_metrics

METRICS = ("breadth", "depth")


def aa_rates(args: argparse.Namespace, rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """A/A false-positive rate of the paired test per metric, with its binomial CI."""
    hits = dict.fromkeys(METRICS, 0)
    size = {"n_test_days": args.days, "n_pre_days": args.pre_days, "coupling": args.coupling}
    for _ in tqdm(range(args.reps), desc="A/A twins", disable=None):
        control, treatment = life_views(synthetic_twin_days(args.users, rng, **size))
        for c, t in zip(user_metrics(control), user_metrics(treatment), strict=True):
            if c.name in hits:
                hits[c.name] += int(paired_compare(c, t).p_value[0] < args.alpha)
    out = {}
    for name, count in hits.items():
        ci = stats.binomtest(count, args.reps).proportion_ci(0.95)
        out[name] = {"false_positive_rate": count / args.reps, "ci_low": ci.low, "ci_high": ci.high}
    return out


def ci_widths(args: argparse.Namespace, rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """Mean twin and standard CI widths of the lift and the variance ratio per metric."""
    size = {"n_test_days": args.days, "n_pre_days": args.pre_days, "coupling": args.coupling}
    lifts = dict.fromkeys(METRICS, args.lift)
    config = ab.AnalysisConfig(alpha=args.alpha)
    z = stats.norm.ppf(1 - args.alpha / 2)
    twin, standard, ratio = ({name: [] for name in METRICS} for _ in range(3))
    for _ in tqdm(range(args.reps), desc="twin vs standard", disable=None):
        table = synthetic_twin_days(args.users, rng, lifts=lifts, **size)
        control, treatment = life_views(table)
        users = aggregate_users(ab.standard_view(table))
        cost = table["completion_tokens"].sum() / ab.standard_view(table)["completion_tokens"].sum()
        for c, t, s in zip(user_metrics(control), user_metrics(treatment), user_metrics(users), strict=True):  # fmt: skip
            if c.name not in twin:
                continue
            paired = paired_compare(c, t)
            est = ab.compare(s, users.treatment, alpha=config.alpha, cuped=config.cuped)
            twin[c.name].append(2 * z * float(paired.lift_se[0]))
            standard[c.name].append(float(est.ci_high[0] - est.ci_low[0]))
            ratio[c.name].append(float(est.se[0] ** 2 / (paired.lift_se[0] ** 2 * cost)))
    return {
        name: {
            "twin_ci_width": float(np.mean(twin[name])),
            "standard_ci_width": float(np.mean(standard[name])),
            "width_ratio": float(np.mean(standard[name]) / np.mean(twin[name])),
            "variance_ratio_equal_tokens": float(np.mean(ratio[name])),
        }
        for name in METRICS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200, help="tables per measurement")
    parser.add_argument("--users", type=int, default=500, help="users per table")
    parser.add_argument("--days", type=int, default=7, help="test days")
    parser.add_argument("--pre-days", type=int, default=7, help="pre-period days")
    parser.add_argument("--coupling", type=float, default=0.9, help="share of shared uniforms")
    parser.add_argument("--lift", type=float, default=0.1, help="planted lift (widths)")
    parser.add_argument("--alpha", type=float, default=0.05, help="test level")
    parser.add_argument("--seed", type=int, default=0, help="seeds every table")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    aa = aa_rates(args, rng)
    widths = ci_widths(args, rng)
    print(
        f"{args.reps} synthetic twin tables of {args.users} users x {args.days} test days "
        f"({args.pre_days} pre), coupling {args.coupling}, alpha {args.alpha}"
    )
    print(
        f"| metric | A/A FPR [95% CI] | twin CI width | standard CI width (CUPED) | "
        f"width ratio | variance ratio at equal tokens (lift {args.lift:+.0%}) |"
    )
    print("|---|---|---|---|---|---|")
    for name in METRICS:
        a, w = aa[name], widths[name]
        print(
            f"| {name} | {a['false_positive_rate']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}] "
            f"| {w['twin_ci_width']:.4f} | {w['standard_ci_width']:.4f} | {w['width_ratio']:.2f} "
            f"| {w['variance_ratio_equal_tokens']:.2f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"settings": vars(args) | {"json": str(args.json)}, "aa": aa, "widths": widths}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
