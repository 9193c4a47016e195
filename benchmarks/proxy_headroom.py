"""Which observable reward, used to pick the best of n replies, raises the gold utility?

Before a recipe spends minutes of training on a reward, this measures what selecting by that
reward can buy at all. From a finished run: ``--contexts`` logged contexts of one
generation's collect day (curated train and held-out splits), ``--samples`` replies each from
the base model at the serving temperature, and for every reply its gold utility (ORACLE,
replayed for the user who wrote the context: ``sim.replay.GoldReplay``) and each proxy a
recipe could use: the generation's reward models, the character checkers (share of
instructions followed, all followed, no prohibition broken) and the logged reply features
(words, emoji, question, echo, MiniLM relevance and persona cosines, ...).

For each proxy and n, the gold of the proxy-best of n samples minus the mean gold of all
samples of the context (the expected best-of-n, ``training.rejection.expected_best_of_n``),
paired over contexts: mean, 95% t interval and n; and the within-context Pearson r of proxy
and gold. The oracle row (best by gold itself) is the ceiling. Usage::

    flywheel run scenarios/quickstart.toml --out runs/quickstart
    .venv/bin/python benchmarks/proxy_headroom.py --run runs/quickstart --json runs/bench/proxy_headroom.json
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pandas as pd
from statsmodels.stats.weightstats import DescrStatsW

from flywheel.store import RunStore, read_logged_world
from policies import PolicySpec, SamplingParams, load_policy
from rewards.checkers import run_checkers
from rewards.embeddings import get_embedder
from rewards.features import reply_features
from rewards.rm.base import load_reward_model
from sim.gold import share_followed
from sim.replay import MOMENT_COLUMNS, GoldReplay
from training.recipes import curated
from training.rejection import expected_best_of_n, sample_candidates

# Reply features a recipe could reward (rewards.features); the rest are derived or constant.
FEATURES = (
    "words", "emoji", "ends_with_question", "exclamations", "repetition", "echo",
    "relevance", "persona_consistency", "prompt_leak",
)  # fmt: skip


@dataclass(frozen=True)
class Args:
    run: str = "runs/quickstart"  # finished run directory (run.duckdb + artifacts/)
    generation: int = 1  # whose collect day's contexts and reward models are read
    contexts: int = 96  # logged contexts sampled (train and held-out splits together)
    samples: int = 8  # replies per context; best-of-n is read for n = 2, 4, ... samples
    max_new_tokens: int = 32  # reply cap, as the scenario serves
    temperature: float = 0.7  # sampling temperature, as the scenario serves
    seed: int = 0  # seeds the context choice and the sampling
    json: str | None = None  # write the table here too (e.g. runs/bench/proxy_headroom.json)


def parse_args() -> Args:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(Args):
        kind = {"int": int, "float": float}.get(f.type, str)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    return Args(**vars(parser.parse_args()))


def logged_contexts(args: Args) -> tuple[pd.DataFrame, Mapping, GoldReplay]:
    """``args.contexts`` curated contexts of the generation's collect day, and the gold."""
    experiment = f"gen{args.generation}-traffic"
    logged = read_logged_world(args.run, experiment)
    prompts = {k: c.system_prompt() for k, c in logged.characters.items()}
    data = curated(logged.turns, prompts, args.seed)
    pool = pd.concat([data.train, data.held_out], ignore_index=True)
    chosen = pool.sample(n=min(args.contexts, len(pool)), random_state=args.seed)
    with RunStore(args.run, read_only=True) as store:
        users = store.read_users()
    gold = GoldReplay(users, logged.turns, logged.characters, logged.world.gold)
    return chosen.reset_index(drop=True), logged.characters, gold


def proxies(run: str, generation: int, samples: pd.DataFrame, characters: Mapping) -> pd.DataFrame:
    """One column per observable proxy of each sampled reply."""
    user_messages = [p[-1]["content"] for p in samples["prompt"]]
    replies = list(samples["reply"])
    out = pd.DataFrame(index=samples.index)
    for folder in sorted((Path(run) / "artifacts" / f"gen{generation}" / "rm").iterdir()):
        model = load_reward_model(folder)
        out[f"rm:{folder.name}"] = np.asarray(model.score(user_messages, replies)).ravel()
    checks = [
        run_checkers(r, characters[c].checkers)
        for r, c in zip(replies, samples["character"], strict=True)
    ]
    out["checkers:share_followed"] = [share_followed(c.checks) for c in checks]
    out["checkers:follows_all"] = [float(c.follows_all) for c in checks]
    out["checkers:no_violation"] = [float(not c.violates_any) for c in checks]
    contexts = [
        characters[c].reply_context(m)
        for c, m in zip(samples["character"], user_messages, strict=True)
    ]
    features = pd.DataFrame(reply_features(get_embedder(), replies, contexts))
    for name in FEATURES:
        out[f"feature:{name}"] = features[name].astype(float).to_numpy()
    return out


def headroom(samples: pd.DataFrame, proxy: str, n: int) -> dict[str, float]:
    """Gold of the proxy-best of ``n`` minus the context's mean gold, paired over contexts."""
    # Replies tied on the proxy (a checker's 0/1, a word count) are picked among at random:
    # each counts with its tie group's mean gold, the expectation over tie-breaks.
    tied_gold = samples.groupby(["context_id", proxy])["gold"].transform("mean")
    gains = np.array([
        expected_best_of_n(g[proxy].to_numpy(), tied_gold[g.index].to_numpy(), n) - g["gold"].mean()
        for _, g in samples.groupby("context_id")
    ])  # fmt: skip
    low, high = DescrStatsW(gains).tconfint_mean(0.05)
    r = [
        np.corrcoef(g[proxy], g["gold"])[0, 1]
        for _, g in samples.groupby("context_id")
        if g[proxy].std() > 0 and g["gold"].std() > 0
    ]
    return {
        "proxy": proxy,
        "n": n,
        "gold_gain": float(gains.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "contexts": len(gains),
        "within_context_r": float(np.mean(r)) if r else float("nan"),
    }


def main() -> None:
    args = parse_args()
    contexts, characters, gold = logged_contexts(args)
    policy = load_policy(PolicySpec(model="smollm2", dtype="auto"))
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed
    )
    samples = sample_candidates(
        policy, list(contexts["prompt"]), list(contexts["character"]), args.samples, params,
        extra=contexts[list(MOMENT_COLUMNS)],
    )  # fmt: skip
    samples["gold"] = gold(samples)
    samples = samples.join(proxies(args.run, args.generation, samples, characters))
    samples["oracle:gold"] = samples["gold"]
    names = [c for c in samples.columns if ":" in c]
    ns = [n for n in (2, 4, 8, 16) if n <= args.samples]
    table = pd.DataFrame([headroom(samples, p, n) for p in names for n in ns])
    print(
        f"{len(contexts)} contexts x {args.samples} samples, mean gold {samples.gold.mean():+.3f}"
    )
    print(table.round(3).to_string(index=False))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        document = {"args": asdict(args), "table": table.to_dict(orient="records")}
        Path(args.json).write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
