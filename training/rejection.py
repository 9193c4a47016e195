"""Rejection sampling and the best-of-n over-optimisation sweep.

Rejection sampling: for each context draw ``n`` replies from the current policy in ONE
batched ``generate`` call, score them with the GRPO reward functions of
``training.rewards`` (reward model, steerability checkers, artifact penalty; each
standardised within its context before the weighted sum, as GRPO does), keep the best
(SFT data) and the best/worst pair (DPO data).

Best-of-n sweep (Gao, Schulman & Hilton, 2022, "Scaling laws for reward model
overoptimization"): choosing the best of ``n`` samples under a proxy reward moves the
policy by KL = log n - (n - 1)/n nats from the sampling policy. Drawing ``N = max(n)``
samples per context once, the expected proxy and gold score of best-of-``n`` are computed
with the unbiased order-statistics estimator (Nakano et al., 2021, WebGPT, appendix):
ranking the ``N`` samples by proxy ascending, sample ``i`` (1-based) is the best of a
uniformly random ``n``-subset with probability ``C(i - 1, n - 1) / C(N, n)``. Gold scoring
is an oracle the simulator owns; it is passed in as a callable by ``flywheel/``, never
imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import comb

from training.rewards import check_rewards

# Given the candidates frame (columns context_id, prompt, character, reply, ... whatever the
# caller put in ``extra``), one gold utility per row.
GoldFn = Callable[[pd.DataFrame], np.ndarray]
# Given contexts (last user messages) and replies, one proxy reward per reply.
ProxyFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]


def sample_candidates(
    policy: Any,
    prompts: Sequence[Sequence[Mapping[str, str]]],
    characters: Sequence[str],
    n: int,
    params: Any,
    extra: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """``n`` replies per prompt from ``policy`` in one batched call.

    Returns one row per reply: context_id (index of the prompt), sample (0..n-1), prompt,
    character, reply, completion_tokens, plus the columns of ``extra`` (one row per prompt,
    e.g. user_id for gold scoring), repeated for each sample.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 samples per context, got {n}")
    if len(prompts) != len(characters):
        raise ValueError(f"got {len(prompts)} prompts but {len(characters)} characters")
    if extra is not None and len(extra) != len(prompts):
        raise ValueError(f"extra has {len(extra)} rows for {len(prompts)} prompts; one per prompt")
    chats = [[dict(m) for m in prompt] for prompt in prompts for _ in range(n)]
    generations = policy.generate(chats, params)
    frame = pd.DataFrame(
        {
            "context_id": np.repeat(np.arange(len(prompts)), n),
            "sample": np.tile(np.arange(n), len(prompts)),
            "prompt": chats,
            "character": np.repeat(np.asarray(characters, dtype=object), n),
            "reply": [g.text for g in generations],
            "completion_tokens": [g.completion_tokens for g in generations],
        }
    )
    if extra is not None:
        repeated = extra.reset_index(drop=True).loc[frame["context_id"]].reset_index(drop=True)
        frame = pd.concat([frame, repeated.drop(columns=frame.columns, errors="ignore")], axis=1)
    return frame


def score_candidates(
    candidates: pd.DataFrame,
    reward_funcs: Sequence[Any],
    weights: Mapping[str, float] | None = None,
    standardise: bool = True,
) -> pd.DataFrame:
    """Add ``reward/<name>`` per reward function and ``score``, their weighted sum after
    standardising each within its context (std 0 -> 0), as GRPO's normalize_then_sum;
    with ``standardise=False`` the plain weighted sum (for rewards already scaled,
    ``training.rewards.ScaledReward``)."""
    out = candidates.copy()
    prompts = list(out["prompt"])
    completions = [[{"role": "assistant", "content": r}] for r in out["reply"]]
    score = np.zeros(len(out))
    for func in reward_funcs:
        name = func.__name__
        values = np.asarray(
            check_rewards(
                name,
                func(prompts, completions, character=list(out["character"])),
                len(out),
            )
        )
        out[f"reward/{name}"] = values
        if not standardise:
            score += (weights or {}).get(name, 1.0) * values
            continue
        grouped = out.groupby("context_id")[f"reward/{name}"]
        std = grouped.transform("std", ddof=0).to_numpy()
        centred = values - grouped.transform("mean").to_numpy()
        standardised = np.divide(centred, std, out=np.zeros_like(centred), where=std > 1e-12)
        score += (weights or {}).get(name, 1.0) * standardised
    out["score"] = score
    return out


def best_replies(scored: pd.DataFrame) -> pd.DataFrame:
    """The best-scoring reply of each context (first sample on ties)."""
    best = scored.loc[scored.groupby("context_id")["score"].idxmax()]
    return best.reset_index(drop=True)


def preference_records(scored: pd.DataFrame, min_margin: float = 1e-6) -> list[dict[str, Any]]:
    """DPO records, best vs worst reply of each context; contexts whose best and worst
    differ by less than ``min_margin`` in score (or in text) give no pair."""
    records = []
    for _, group in scored.groupby("context_id", sort=True):
        best = group.loc[group["score"].idxmax()]
        worst = group.loc[group["score"].idxmin()]
        if best["score"] - worst["score"] < min_margin or best["reply"] == worst["reply"]:
            continue
        records.append(
            {
                "prompt": list(best["prompt"]),
                "chosen": [{"role": "assistant", "content": best["reply"]}],
                "rejected": [{"role": "assistant", "content": worst["reply"]}],
            }
        )
    return records


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || sampling policy) = log n - (n - 1) / n, in nats."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return float(np.log(n) - (n - 1) / n)


def expected_best_of_n(proxy: np.ndarray, values: np.ndarray, n: int) -> float:
    """Expected ``values`` of the proxy-best of ``n`` draws without replacement from the
    ``N = len(proxy)`` samples of one context (unbiased order-statistics estimator)."""
    size = len(proxy)
    if not 1 <= n <= size:
        raise ValueError(f"best-of-{n} needs at least {n} samples per context, got {size}")
    order = np.argsort(proxy, kind="stable")
    ranks = np.arange(1, size + 1)
    weights = comb(ranks - 1, n - 1, exact=False) / comb(size, n, exact=False)
    return float(np.dot(weights, values[order]))


@dataclass(frozen=True)
class SweepResult:
    """The best-of-n curve: one row per n in ``table`` with columns n, kl, sqrt_kl,
    proxy, proxy_se, gold, gold_se (means over contexts and their standard errors),
    and the per-sample standard deviations at n = 1 used to put both on one scale."""

    table: pd.DataFrame
    proxy_sd: float
    gold_sd: float
    n_contexts: int

    def summary(self) -> str:
        """Fixed-width table for terminals and logs."""
        lines = [
            f"best-of-n over {self.n_contexts} contexts (sd at n=1: proxy {self.proxy_sd:.3f}, "
            f"gold {self.gold_sd:.3f})",
            f"{'n':>4}{'KL':>8}{'sqrt KL':>9}{'proxy':>11}{'± se':>10}{'gold':>11}{'± se':>10}",
        ]
        for row in self.table.itertuples(index=False):  # scores of any scale stay apart
            lines.append(
                f"{row.n:>4}{row.kl:>8.3f}{row.sqrt_kl:>9.3f}{row.proxy:>11.4g}"
                f"{row.proxy_se:>10.3g}{row.gold:>11.4g}{row.gold_se:>10.3g}"
            )
        return "\n".join(lines)

    def plot(self, path: str | Path, title: str = "Best-of-n: proxy vs gold") -> Path:
        """PNG of proxy and gold gain over n = 1 (in n = 1 standard deviations) vs sqrt(KL)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        base = self.table.iloc[0]
        fig, ax = plt.subplots(figsize=(6, 4))
        for column, label, sd in (
            ("proxy", "proxy reward (reward model)", self.proxy_sd),
            ("gold", "gold utility (oracle)", self.gold_sd),
        ):
            scale = sd if sd > 0 else 1.0
            gain = (self.table[column] - base[column]) / scale
            err = self.table[f"{column}_se"] / scale
            ax.errorbar(self.table["sqrt_kl"], gain, yerr=err, marker="o", capsize=3, label=label)
        for row in self.table.itertuples(index=False):
            ax.annotate(
                f"n={row.n}",
                (row.sqrt_kl, 0),
                textcoords="offset points",
                xytext=(0, -14),
                ha="center",
                fontsize=7,
                color="grey",
            )
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("sqrt(KL) = sqrt(log n - (n-1)/n)")
        ax.set_ylabel("gain over n = 1 (sd of n = 1 samples)")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def best_of_n_sweep(
    candidates: pd.DataFrame, ns: Sequence[int], proxy_column: str, gold_column: str
) -> SweepResult:
    """Expected proxy and gold of best-of-n for each n, averaged over contexts.

    ``candidates`` holds at least ``max(ns)`` scored samples per context_id.
    """
    ns = sorted(set(int(n) for n in ns))
    if not ns or ns[0] < 1:
        raise ValueError(f"ns must be positive integers, got {ns}")
    for column in (proxy_column, gold_column):
        values = candidates[column].to_numpy(dtype=float)
        if not np.isfinite(values).all():
            raise ValueError(f"column {column!r} has non-finite values; score every sample")
    per_context: dict[int, list[tuple[float, float]]] = {n: [] for n in ns}
    for _, group in candidates.groupby("context_id"):
        proxy = group[proxy_column].to_numpy(dtype=float)
        gold = group[gold_column].to_numpy(dtype=float)
        if len(group) < ns[-1]:
            raise ValueError(
                f"context {group['context_id'].iloc[0]} has {len(group)} samples, best-of-"
                f"{ns[-1]} needs {ns[-1]}; sample n = max(ns) per context"
            )
        for n in ns:
            per_context[n].append(
                (expected_best_of_n(proxy, proxy, n), expected_best_of_n(proxy, gold, n))
            )
    rows = []
    for n in ns:
        values = np.asarray(per_context[n])
        k = len(values)
        rows.append(
            {
                "n": n,
                "kl": best_of_n_kl(n),
                "sqrt_kl": float(np.sqrt(best_of_n_kl(n))),
                "proxy": float(values[:, 0].mean()),
                "proxy_se": float(values[:, 0].std(ddof=1) / np.sqrt(k)) if k > 1 else 0.0,
                "gold": float(values[:, 1].mean()),
                "gold_se": float(values[:, 1].std(ddof=1) / np.sqrt(k)) if k > 1 else 0.0,
            }
        )
    return SweepResult(
        table=pd.DataFrame(rows),
        proxy_sd=float(candidates[proxy_column].std(ddof=1)),
        gold_sd=float(candidates[gold_column].std(ddof=1)),
        n_contexts=int(candidates["context_id"].nunique()),
    )


def run_best_of_n_sweep(
    policy: Any,
    prompts: Sequence[Sequence[Mapping[str, str]]],
    characters: Sequence[str],
    ns: Sequence[int],
    proxy: ProxyFn,
    gold: GoldFn,
    params: Any,
    extra: pd.DataFrame | None = None,
) -> tuple[SweepResult, pd.DataFrame]:
    """Sample ``max(ns)`` replies per prompt, score them with ``proxy`` and ``gold``,
    and return the sweep and the scored candidates."""
    candidates = sample_candidates(policy, prompts, characters, max(ns), params, extra)
    contexts = [
        next((m["content"] for m in reversed(p) if m["role"] == "user"), "")
        for p in candidates["prompt"]
    ]
    candidates["proxy"] = check_rewards(
        "proxy", np.asarray(proxy(contexts, list(candidates["reply"]))).ravel(), len(candidates)
    )
    candidates["gold"] = check_rewards(
        "gold", np.asarray(gold(candidates)).ravel(), len(candidates)
    )
    return best_of_n_sweep(candidates, ns, "proxy", "gold"), candidates
