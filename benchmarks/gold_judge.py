"""The gold's judge against the proxies' encoder: speed, and before / after on logged traffic.

1. Speed. Encode time of 256 short human chat messages (chitchat-dataset), the judge
   (``sim.judge``, all-mpnet-base-v2) against MiniLM (``rewards.embeddings``), median of
   ``--repeats`` calls after a warm-up; the 1-minute load average is printed beside it.
2. Before / after on the same logged turns of RUN_DIR (a run of ``flywheel ab`` or
   ``flywheel run``): every gold term is recomputed per turn (``flywheel.rm_eval.
   logged_gold_terms``) twice, *before* (MiniLM cosines at the MiniLM-scale centers and
   weights, ``sim.judge.MINILM_SCALE``: the gold as it was) and *after* (the judge at
   ``sim.gold.GoldConfig``'s centers and weights). One naive MiniLM pointwise reward model is
   trained on the run's training users (seeded split); on the held-out users' turns the
   script reports its Pearson / Spearman correlation with each gold, and on every sampled
   turn the leak probe (``flywheel.rm_eval.leak_probe``) of its inputs against each gold's
   terms. ``before_matches_logged`` says whether the run was logged under the MiniLM gold
   (its recomputed total equals the logged ``gold_satisfaction``).

    .venv/bin/python benchmarks/gold_judge.py runs/ab_small --json runs/ab_small/gold_judge.json

Figures and how to read them: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def encode_seconds(encoder: Any, texts: list[str], repeats: int) -> float:
    """Median wall seconds of one ``encode(texts)`` call, after one warm-up call."""
    encoder.encode(texts)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        encoder.encode(texts)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def speed(repeats: int, seed: int) -> dict[str, Any]:
    """Encode time per 256 short texts, judge vs MiniLM."""
    from rewards.embeddings import get_embedder
    from sim.chitchat import load_chitchat
    from sim.judge import get_judge

    messages = load_chitchat().replies("heldout")
    rng = np.random.default_rng(seed)
    texts = [messages[i] for i in rng.choice(len(messages), size=256, replace=False)]
    minilm = encode_seconds(get_embedder(), texts, repeats)
    judge = encode_seconds(get_judge(), texts, repeats)
    return {
        "texts": len(texts),
        "mean_words": float(np.mean([len(t.split()) for t in texts])),
        "minilm_s": minilm,
        "judge_s": judge,
        "ratio": judge / minilm,
        "load_avg_1min": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }


def before_after(run_dir: str, rows: int, seed: int) -> dict[str, Any]:
    """RM-gold correlation and leak probe under the MiniLM gold and the judge's gold."""
    from dataclasses import asdict

    from flywheel.rm_eval import (
        TOTAL_TERM,
        _sample,
        _split_users,
        gold_correlation,
        leak_probe,
        load_run_tables,
        logged_gold_terms,
        recorded_world,
        rm_inputs,
        train_and_evaluate,
    )
    from rewards.embeddings import get_embedder
    from sim.gold import GoldConfig
    from sim.judge import MINILM_SCALE, SEMANTIC_TERMS

    turns, activity, comparisons = load_run_tables(run_dir)
    world = recorded_world(run_dir)
    if world is None:
        raise SystemExit(f"{run_dir} records no world; log traffic with flywheel ab first")
    semantic = [name for pair in SEMANTIC_TERMS.values() for name in pair]
    judge_scale = {k: getattr(GoldConfig(), k) for k in semantic}
    minilm_gold = world.gold.model_copy(update=asdict(MINILM_SCALE))
    judge_gold = world.gold.model_copy(update=judge_scale)
    rng = np.random.default_rng(seed)
    sample = _sample(np.arange(len(turns)), rows, rng)
    started = time.perf_counter()
    before = logged_gold_terms(
        run_dir, turns, rows=sample, gold_config=minilm_gold, judge=get_embedder()
    )
    after = logged_gold_terms(run_dir, turns, rows=sample, gold_config=judge_gold)
    terms_seconds = time.perf_counter() - started
    logged = turns["gold_satisfaction"].to_numpy()[sample]

    test_users = _split_users(list(turns["user_id"].astype(str)), rng, 0.2)
    model, _ = train_and_evaluate(
        turns, comparisons, "pointwise", "minilm", activity=activity, seed=seed,
        test_users=test_users,
    )  # fmt: skip
    picked = turns.iloc[sample]
    contexts, replies = list(picked["user_message"]), list(picked["bot_reply"])
    held_out = picked["user_id"].astype(str).isin(test_users).to_numpy()
    scores = model.score(
        [c for c, h in zip(contexts, held_out, strict=True) if h],
        [r for r, h in zip(replies, held_out, strict=True) if h],
    )
    inputs = rm_inputs(model, contexts, replies)
    out: dict[str, Any] = {
        "run_dir": run_dir,
        "rows": len(sample),
        "held_out_rows": int(held_out.sum()),
        "seed": seed,
        "model": model.name,
        "terms_seconds": terms_seconds,
        "before_matches_logged": bool(
            np.allclose(before[TOTAL_TERM].to_numpy(), logged, atol=1e-4)
        ),
    }
    for label, terms in (("before", before), ("after", after)):
        total = terms[TOTAL_TERM].to_numpy()
        out[label] = {
            "rm_gold": gold_correlation(scores, total[held_out]).to_dict(),
            "gold_sd": float(total.std()),
            "term_sd": {k: float(v) for k, v in terms.std().items()},
            "leak_probe": leak_probe(inputs, terms, seed=seed).to_dict(),
        }
    return out


def print_report(result: dict[str, Any]) -> None:
    """The figures as aligned lines."""
    if "speed" in result:
        s = result["speed"]
        print(
            f"encode {s['texts']} short texts (mean {s['mean_words']:.1f} words): MiniLM "
            f"{s['minilm_s']:.3f} s, judge {s['judge_s']:.3f} s ({s['ratio']:.1f}x); "
            f"load average {s['load_avg_1min']:.2f} on {s['cpus']} CPUs"
        )
    if "before_after" not in result:
        return
    r = result["before_after"]
    print(
        f"{r['run_dir']}: {r['rows']} turns ({r['held_out_rows']} held out), {r['model']}; "
        f"before matches the logged gold: {r['before_matches_logged']}"
    )
    for label in ("before", "after"):
        g = r[label]["rm_gold"]
        print(
            f"  {label:<6} RM-gold pearson {g['pearson_r']:+.3f} spearman "
            f"{g['spearman_rho']:+.3f} (n={g['n']})"
        )
    terms = r["after"]["leak_probe"]["terms"]
    print(f"  {'term':<20} {'before lin/mlp':>16} {'after lin/mlp':>16}")
    for term in terms:
        b = r["before"]["leak_probe"]["terms"].get(term)
        a = terms[term]
        left = f"{b['linear_r2']:+.2f}/{b['nonlinear_r2']:+.2f}" if b else "-"
        print(f"  {term:<20} {left:>16} {a['linear_r2']:+.2f}/{a['nonlinear_r2']:+.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", help="run with logged traffic (before / after)")
    parser.add_argument("--rows", type=int, default=2000, help="turns sampled (seeded)")
    parser.add_argument("--seed", type=int, default=0, help="seeds sampling, split and probes")
    parser.add_argument("--repeats", type=int, default=5, help="timed encode calls")
    parser.add_argument("--no-speed", action="store_true", help="skip the encode timing")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    result: dict[str, Any] = {}
    if not args.no_speed:
        result["speed"] = speed(args.repeats, args.seed)
    if args.run_dir:
        result["before_after"] = before_after(args.run_dir, args.rows, args.seed)
    print_report(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
