"""Train a reward model on a run's logs and judge it, against the oracle too.

This module lives in ``flywheel/`` because it reads the gold utility: the ``gold_*``
columns of the run store's turns table and of the annotators' comparisons. Reward code
(``rewards/``) only ever receives the tables with those columns dropped.

:func:`train_and_evaluate` splits users into train and held-out (every table by the same
users), fits one reward model and reports on the held-out users:

- ``pairwise_accuracy``: agreement with the simulated annotators' held-out labels;
- ``calibration``: per target, for pointwise and signals models (AUC, Brier, ECE...);
- ``gold_correlation``: Pearson and Spearman correlation of the reward with the gold
  utility of held-out logged replies (proxy vs gold), and the share of held-out pairs the
  reward orders as the gold utility of the pair's annotator does;
- ``style_correlations``: correlation of the reward with each style feature on held-out
  logged replies, and the largest absolute Pearson r;
- ``style_sensitivity``: the reward a content-free style edit (emoji, "!!", a filler
  sentence) adds to the same held-out replies, in units of the reward's spread;
- the training time and, for style-controlled models, the fitted style coefficients;
- ``leak_probe`` (when the gold terms of the logged turns are given, as ``rm_train`` does):
  how well the reward model's own inputs predict each gold term (:func:`leak_probe`).

The leak probe guards the second half of the oracle invariant (``sim.judge``): the gold must
not be readable from what a reward model reads. For each term of the gold utility
(``sim.gold.GoldModel.utility_terms``, recomputed per logged turn by
:func:`logged_gold_terms`) and for the total, it reports the out-of-fold R^2 (seeded
``KFold``) of the best linear fit (``RidgeCV``) and of a small non-linear fit (an MLP with
one hidden layer) from the model's inputs (:func:`rm_inputs`). A term at R^2 >=
``LEAK_THRESHOLD`` is a leak: a reward model could copy the oracle's term instead of
learning what users want.

Comparisons: until the run store has a table for them, the annotators' labels are kept in
``RUN_DIR/artifacts/comparisons.parquet`` (:func:`write_comparisons`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from rewards.datasets import (
    ORACLE_PREFIX,
    as_lists,
    drop_oracle_columns,
    pairwise_examples,
    pointwise_examples,
)
from rewards.evaluation import calibration, evaluate_pairwise, style_sensitivity
from rewards.rm import LLMConfig, MiniLMConfig, RewardModel, check_backbone, resolve_targets
from rewards.style_control import max_abs_style_correlation, style_correlations

if TYPE_CHECKING:
    from rewards.embeddings import Embedder
    from sim.gold import GoldConfig
    from sim.world import WorldConfig

COMPARISONS_FILE = "comparisons.parquet"
EVAL_FILE = "rm_eval.json"
RM_DIR = "rm"  # under the run's artifacts folder: artifacts/rm/<model name>/


@dataclass(frozen=True)
class GoldCorrelation:
    """Correlation of a reward with the gold utility over a set of replies."""

    pearson_r: float
    pearson_p: float
    spearman_rho: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready form."""
        return asdict(self)


def gold_correlation(
    scores: Sequence[float] | np.ndarray, gold: Sequence[float] | np.ndarray
) -> GoldCorrelation:
    """Pearson (scipy) and Spearman correlation of reward ``scores`` with ``gold`` utility."""
    x, y = np.asarray(scores, dtype=float), np.asarray(gold, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise ValueError(
            f"gold_correlation needs two equal-length 1-d arrays of >= 3 values, got "
            f"{x.shape} and {y.shape}"
        )
    if x.std() == 0 or y.std() == 0:
        return GoldCorrelation(float("nan"), float("nan"), float("nan"), len(x))
    pearson = stats.pearsonr(x, y)
    return GoldCorrelation(
        float(pearson.statistic),
        float(pearson.pvalue),
        float(stats.spearmanr(x, y).statistic),
        len(x),
    )


def pairwise_gold_agreement(
    score_a: np.ndarray, score_b: np.ndarray, gold_a: np.ndarray, gold_b: np.ndarray
) -> float:
    """Share of pairs the reward orders as the gold utility does (reward ties count half;
    pairs the gold utility cannot separate are left out)."""
    gold_diff = np.asarray(gold_a) - np.asarray(gold_b)
    score_diff = np.asarray(score_a) - np.asarray(score_b)
    keep = gold_diff != 0
    if not keep.any():
        return float("nan")
    agree = np.sign(score_diff[keep]) == np.sign(gold_diff[keep])
    return float(np.mean(agree + 0.5 * (score_diff[keep] == 0)))


LEAK_THRESHOLD = 0.9  # R^2 at which a gold term counts as readable from a model's inputs
PROBE_ROWS = 2000  # logged turns the leak probe fits on at most (a seeded sample)
TOTAL_TERM = "total"  # the leak probe's name for the whole gold utility


@dataclass(frozen=True)
class TermProbe:
    """How well a model's inputs predict one gold term (out-of-fold R^2)."""

    term: str
    linear_r2: float
    nonlinear_r2: float
    sd: float

    @property
    def best_r2(self) -> float:
        """The better of the two fits: what a probe of either kind can read."""
        return max(self.linear_r2, self.nonlinear_r2)


@dataclass(frozen=True)
class LeakProbe:
    """The leak probe of one set of inputs against the gold terms (:func:`leak_probe`)."""

    terms: tuple[TermProbe, ...]
    constant_terms: tuple[str, ...]
    n: int
    n_inputs: int
    folds: int
    seed: int
    threshold: float

    def leaks(self) -> list[str]:
        """Terms readable at R^2 >= ``threshold`` by either fit."""
        return [t.term for t in self.terms if t.best_r2 >= self.threshold]

    def max_r2(self) -> float:
        """The largest R^2 over terms and fits."""
        return max((t.best_r2 for t in self.terms), default=float("nan"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``rm_eval.json``'s ``leak_probe``)."""
        return {
            "terms": {
                t.term: {"linear_r2": t.linear_r2, "nonlinear_r2": t.nonlinear_r2, "sd": t.sd}
                for t in self.terms
            },
            "constant_terms": list(self.constant_terms),
            "max_r2": self.max_r2(),
            "leaks": self.leaks(),
            "n": self.n,
            "n_inputs": self.n_inputs,
            "folds": self.folds,
            "seed": self.seed,
            "threshold": self.threshold,
        }

    def summary(self) -> str:
        """One line per term: linear and non-linear R^2, and LEAK where it reaches the bar."""
        lines = [f"leak probe (out-of-fold R^2, {self.folds} folds, n={self.n}):"]
        for t in self.terms:
            flag = "  LEAK" if t.best_r2 >= self.threshold else ""
            lines.append(
                f"  {t.term:<14} linear {t.linear_r2:+.3f}  mlp {t.nonlinear_r2:+.3f}{flag}"
            )
        return "\n".join(lines)


def _out_of_fold_r2(model: Any, x: np.ndarray, y: np.ndarray, cv: Any) -> np.ndarray:
    from sklearn.metrics import r2_score
    from sklearn.model_selection import cross_val_predict

    predicted = cross_val_predict(model, x, y, cv=cv)
    return np.atleast_1d(r2_score(y, predicted, multioutput="raw_values"))


def leak_probe(
    inputs: np.ndarray,
    terms: pd.DataFrame,
    *,
    folds: int = 5,
    seed: int = 0,
    threshold: float = LEAK_THRESHOLD,
) -> LeakProbe:
    """Out-of-fold R^2 of predicting each column of ``terms`` from ``inputs``.

    Two probes, both standardising the inputs, fitted on ``folds`` seeded ``KFold`` splits
    and scored on the rows each fold held out (``cross_val_predict``; R^2 of the pooled
    out-of-fold predictions): ``RidgeCV`` with its penalty chosen per term (the best
    linear read-out), and an MLP with one hidden layer of 64 units fitted to all
    standardised terms at once (a small non-linear read-out, early-stopped). Terms that do
    not vary over the rows (the bias, a novelty of 0) cannot be predicted or leaked and are
    listed as ``constant_terms``.
    """
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(inputs, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(terms):
        raise ValueError(
            f"leak_probe needs a 2-d inputs array with one row per terms row, got inputs "
            f"{x.shape} and {len(terms)} terms rows"
        )
    if len(x) < 5 * folds:
        raise ValueError(f"leak_probe needs >= {5 * folds} rows for {folds} folds, got {len(x)}")
    y_all = terms.to_numpy(dtype=np.float64)
    sd = y_all.std(axis=0)
    varying = sd > 1e-9 * np.maximum(1.0, np.abs(y_all).max(axis=0))
    names = [str(c) for c in terms.columns]
    y = y_all[:, varying]
    cv = KFold(n_splits=folds, shuffle=True, random_state=seed)
    linear = make_pipeline(
        StandardScaler(), RidgeCV(alphas=np.logspace(-3, 5, 17), alpha_per_target=True)
    )
    mlp = TransformedTargetRegressor(
        regressor=make_pipeline(
            StandardScaler(),
            MLPRegressor(
                hidden_layer_sizes=(64,),
                alpha=1e-2,
                early_stopping=True,
                max_iter=500,
                random_state=seed,
            ),
        ),
        transformer=StandardScaler(),
    )
    r2_linear = _out_of_fold_r2(linear, x, y, cv) if y.shape[1] else np.zeros(0)
    r2_mlp = _out_of_fold_r2(mlp, x, y, cv) if y.shape[1] else np.zeros(0)
    kept = [n for n, v in zip(names, varying, strict=True) if v]
    probes = tuple(
        TermProbe(term, float(a), float(b), float(s))
        for term, a, b, s in zip(kept, r2_linear, r2_mlp, sd[varying], strict=True)
    )
    constant = tuple(n for n, v in zip(names, varying, strict=True) if not v)
    return LeakProbe(probes, constant, len(x), x.shape[1], folds, seed, threshold)


def rm_inputs(model: RewardModel, contexts: Sequence[str], replies: Sequence[str]) -> np.ndarray:
    """What the model's trained part reads for each (context, reply): the head's input
    vector of a MiniLM model (``features``); for an LLM model, the backbone's last hidden
    state at the last token, which its score head reads (of the first target's adapter)."""
    features = getattr(model, "features", None)
    if callable(features):
        return np.asarray(features(as_lists(contexts), as_lists(replies)), dtype=np.float64)
    return _llm_last_hidden(model, as_lists(contexts), as_lists(replies))


def _llm_last_hidden(model: Any, contexts: list[str], replies: list[str]) -> np.ndarray:
    import torch

    from rewards.style_control import strip_style

    if model.style_controlled:
        replies = [strip_style(r) for r in replies]
    network = model.models[model.targets[0]]
    tokenizer, limit = model.tokenizer, model.config.max_length
    chats = [
        [{"role": "user", "content": c}, {"role": "assistant", "content": r}]
        for c, r in zip(contexts, replies, strict=True)
    ]
    rows = []
    for start in range(0, len(chats), model.config.score_batch_size):
        ids = [
            tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"][
                -limit:
            ]
            for chat in chats[start : start + model.config.score_batch_size]
        ]
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with torch.no_grad():
            out = network(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        last = out.hidden_states[-1][torch.arange(len(ids)), mask.sum(dim=1) - 1]
        rows.append(last.float().numpy())
    return np.concatenate(rows).astype(np.float64)


def recorded_world(run_dir: str | Path) -> WorldConfig | None:
    """The world a run's first experiment was simulated in, or None when its config records
    no world (``flywheel.store.stored_world``)."""
    from flywheel.store import RunStore, stored_world

    with RunStore(run_dir, read_only=True) as store:
        experiments = store.experiments()
    return None if experiments.empty else stored_world(experiments["config"].iloc[0])


def logged_gold_terms(
    run_dir: str | Path,
    turns: pd.DataFrame,
    *,
    rows: Sequence[int] | None = None,
    gold_config: GoldConfig | None = None,
    judge: Embedder | None = None,
) -> pd.DataFrame:
    """Each gold-utility term (``sim.gold.GoldModel.utility_terms``) of logged turns, and
    their sum (``total``), as the user who read the reply had it then.

    ``turns`` is the run store's turns table (``read_turns``, not flat). Users are rebuilt
    from their logged traits; each user's emoji exposure is replayed from the logged replies
    in serving order, per experiment and user life (``GoldModel.start_session`` at each
    session). Only ``rows`` (positions in ``turns``; default all) are judged and returned,
    indexed by position. ``gold_config`` defaults to the run's ``[world.gold]``;
    ``judge`` to ``sim.judge.get_judge()`` (pass the MiniLM embedder and its scale to
    recompute a gold from before the judge). A run of a twin design replays each life
    from its own logged replies only (the pre-period exposure it shared is not carried
    into the other life), so its ``emoji_tire`` can be low there.
    """
    from dataclasses import fields as dc_fields

    from flywheel.store import RunStore
    from sim.characters import load_characters, select_characters
    from sim.gold import GoldModel, assess_replies
    from sim.population import User, UserState, UserTraits

    world = recorded_world(run_dir)
    if world is None:
        raise ValueError(
            f"run {run_dir} records no world (its experiments' config has no [world] "
            "table), so its gold terms cannot be recomputed; fix: log traffic with "
            "flywheel ab / flywheel run"
        )
    with RunStore(run_dir, read_only=True) as store:
        users = store.read_users().drop_duplicates("user_id").set_index("user_id")
    characters = select_characters(load_characters(world.characters_dir), world.characters)
    gold = GoldModel(gold_config or world.gold)
    wanted = sorted(set(range(len(turns)) if rows is None else (int(r) for r in rows)))
    table = turns.reset_index(drop=True)
    picked = table.iloc[wanted]
    chars = [characters[c] for c in picked["character"]]
    assessed = assess_replies(
        chars,
        list(picked["bot_reply"]),
        [c.reply_context(m) for c, m in zip(chars, picked["user_message"], strict=True)],
        [dict(f) for f in picked["features"]],
        judge,
    )
    assessments = {position: a for position, (a, _) in zip(wanted, assessed, strict=True)}
    trait_names = {f.name for f in dc_fields(UserTraits)}
    group_keys = [k for k in ("experiment_id", "life", "user_id") if k in table.columns]
    order = table.sort_values([*group_keys, "day", "hour", "session_id", "turn_index"])
    out: dict[int, dict[str, float]] = {}
    for _, history in order.groupby(group_keys, sort=False, dropna=False):
        user_id = str(history["user_id"].iloc[0])
        traits = {k: v for k, v in users.loc[user_id, "traits"].items() if k in trait_names}
        traits["topic_interests"] = tuple(traits["topic_interests"])
        user = User(user_id, str(users.loc[user_id, "segment"]), UserTraits(**traits), UserState())
        session = None
        for position, row in zip(history.index, history.itertuples(index=False), strict=True):
            if row.session_id != session:
                gold.start_session(user, int(row.day))
                session = row.session_id
            if position in assessments:
                terms = gold.utility_terms(
                    user, characters[row.character], assessments[position], float(row.novelty)
                )
                out[position] = terms | {TOTAL_TERM: float(sum(terms.values()))}
            user.state.emoji_exposure += float(row.features["emoji"])
    return pd.DataFrame.from_dict(out, orient="index").loc[wanted]


def comparisons_path(run_dir: str | Path) -> Path:
    """Where a run keeps its annotators' comparisons."""
    return Path(run_dir) / "artifacts" / COMPARISONS_FILE


def write_comparisons(run_dir: str | Path, comparisons: pd.DataFrame) -> Path:
    """Append comparisons (``sim.annotators.comparisons_frame``) to the run's file."""
    path = comparisons_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        comparisons = pd.concat([pd.read_parquet(path), comparisons], ignore_index=True)
    comparisons.to_parquet(path, index=False)
    return path


def read_comparisons(run_dir: str | Path) -> pd.DataFrame | None:
    """The run's comparisons, or None when no annotators have labelled pairs yet."""
    path = comparisons_path(run_dir)
    return pd.read_parquet(path) if path.exists() else None


def load_run_tables(
    run_dir: str | Path, experiment_id: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    """(turns, activity, comparisons) of a run; activity = active (user_id, day) rows."""
    from flywheel.store import RunStore

    with RunStore(run_dir, read_only=True) as store:
        turns = store.read_turns(experiment_id)
        user_days = store.read_user_days(experiment_id)
    if turns.empty:
        raise ValueError(
            f"run {run_dir} has no logged turns; run traffic (flywheel ab / flywheel run) first"
        )
    activity = None
    if not user_days.empty:
        activity = user_days.loc[user_days["active"].astype(bool), ["user_id", "day"]]
    return turns, activity, read_comparisons(run_dir)


def _split_users(user_ids: Sequence[str], rng: np.random.Generator, test_size: float) -> set[str]:
    users = np.asarray(sorted(set(user_ids)))
    if len(users) < 2:
        raise ValueError(f"need at least 2 users to hold some out, got {len(users)}")
    n_test = min(len(users) - 1, max(1, round(test_size * len(users))))
    return set(rng.permutation(users)[:n_test].tolist())


def _sample(rows: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    if limit is None or len(rows) <= limit:
        return rows
    return np.sort(rng.choice(rows, size=limit, replace=False))


@dataclass(frozen=True)
class _ModelSpec:
    """Which reward model ``train_and_evaluate`` fits (``rewards.rm``); checked on creation."""

    kind: str
    backbone: str
    style_controlled: bool
    target: str | None  # pointwise only: the logged signal fitted instead of ``engaged``

    def __post_init__(self) -> None:
        resolve_targets(self.kind, self.target)
        check_backbone(self.backbone)

    def fit(
        self,
        table: pd.DataFrame,
        *,
        seed: int,
        minilm_config: MiniLMConfig | None,
        llm_config: LLMConfig | None,
        verbose: bool,
    ) -> RewardModel:
        """Train on ``table`` with the backbone's config, its seed replaced by ``seed``."""
        if self.backbone == "minilm":
            from rewards.rm import train_minilm as fit

            config: MiniLMConfig | LLMConfig = replace(minilm_config or MiniLMConfig(), seed=seed)
        else:
            from rewards.rm import train_llm as fit

            config = replace(llm_config or LLMConfig(), seed=seed)
        return fit(
            self.kind,
            table,
            style_controlled=self.style_controlled,
            config=config,
            target=self.target,
            verbose=verbose,
        )

    def describe(self, model: RewardModel) -> dict[str, Any]:
        """The report's first keys: the fitted model's name and targets, and this spec."""
        return {
            "model": model.name,
            "kind": self.kind,
            "backbone": self.backbone,
            "style_controlled": self.style_controlled,
            "targets": list(model.targets),
        }


@dataclass(frozen=True)
class _UserSplit:
    """One split of a run's tables by user: the training rows and the held-out rows scored."""

    examples: pd.DataFrame  # pointwise examples of every logged turn (oracle columns dropped)
    test_users: set[str]
    max_eval_rows: int | None  # the cap on each held-out sample (None = all)
    turns_train: pd.DataFrame  # pointwise examples of the training users
    turns_test: pd.DataFrame  # the held-out sample of pointwise examples
    gold_test: np.ndarray  # gold_satisfaction of ``turns_test``
    pairs_train: pd.DataFrame | None  # pairwise examples of the training users (None: none)
    pairs_test: pd.DataFrame | None  # the held-out sample of pairwise examples
    comparisons_test: pd.DataFrame | None  # the comparisons behind ``pairs_test`` (gold kept)

    def sizes(self) -> dict[str, Any]:
        """The report's held-out sample sizes."""
        return {
            "n_test_users": len(self.test_users),
            "n_test_turns": len(self.turns_test),
            "max_eval_rows": self.max_eval_rows,
            "n_test_pairs": 0 if self.pairs_test is None else len(self.pairs_test),
        }


@dataclass(frozen=True)
class _HoldOut:
    """How ``train_and_evaluate`` holds users out; checked on creation."""

    seed: int
    test_size: float  # share of users held out when ``test_users`` is None
    max_eval_rows: int | None  # score at most this many held-out turns and pairs
    test_users: set[str] | None  # hold out exactly these users

    def __post_init__(self) -> None:
        if not 0 < self.test_size < 1:
            raise ValueError(f"test_size must be in (0, 1), got {self.test_size}")
        if self.max_eval_rows is not None and self.max_eval_rows < 3:
            raise ValueError(f"max_eval_rows must be >= 3 or None, got {self.max_eval_rows}")

    def split(
        self,
        turns: pd.DataFrame,
        comparisons: pd.DataFrame | None,
        activity: pd.DataFrame | None,
    ) -> _UserSplit:
        """Hold the same users out of every table.

        One generator seeded by ``seed`` draws, in this order, the users (unless given), the
        held-out turns sample and the held-out pairs sample: a seed gives one split.
        """
        rng = np.random.default_rng(self.seed)
        users = list(turns["user_id"].astype(str))
        if comparisons is not None:
            users += list(comparisons["user_id"].astype(str))
        test_users = self.test_users
        if test_users is None:
            test_users = _split_users(users, rng, self.test_size)

        examples = pointwise_examples(drop_oracle_columns(turns), activity)
        gold = turns["gold_satisfaction"].to_numpy(dtype=float)
        is_test = examples["user_id"].isin(test_users).to_numpy()
        keep = _sample(np.flatnonzero(is_test), self.max_eval_rows, rng)
        pairs_train = pairs_test = comparisons_test = None
        if comparisons is not None and not comparisons.empty:
            cmp_is_test = comparisons["user_id"].astype(str).isin(test_users).to_numpy()
            pairs = pairwise_examples(drop_oracle_columns(comparisons))
            keep_pairs = _sample(np.flatnonzero(cmp_is_test), self.max_eval_rows, rng)
            pairs_train, pairs_test = pairs[~cmp_is_test], pairs.iloc[keep_pairs]
            comparisons_test = comparisons.iloc[keep_pairs]
        return _UserSplit(
            examples=examples,
            test_users=test_users,
            max_eval_rows=self.max_eval_rows,
            turns_train=examples[~is_test],
            turns_test=examples.iloc[keep],
            gold_test=gold[keep],
            pairs_train=pairs_train,
            pairs_test=pairs_test,
            comparisons_test=comparisons_test,
        )


def _require_comparisons(kind: str, comparisons: pd.DataFrame | None) -> None:
    """A pairwise model learns from the annotators' comparisons only."""
    if kind == "pairwise" and (comparisons is None or comparisons.empty):
        raise ValueError(
            "kind 'pairwise' needs annotator comparisons and the run has none; label pairs "
            "with sim.annotators and flywheel.rm_eval.write_comparisons first"
        )


def _training_table(kind: str, split: _UserSplit) -> pd.DataFrame:
    """The rows the model fits: pairs for ``pairwise``, else turns; never an oracle column."""
    table = split.pairs_train if kind == "pairwise" else split.turns_train
    if table is None or table.empty:
        raise ValueError(f"no training rows for kind {kind!r} after holding out test users")
    leaked = [c for c in table.columns if c.startswith(ORACLE_PREFIX)]
    if leaked:  # the invariant: no reward model fits the oracle
        raise RuntimeError(f"oracle columns {leaked} reached reward-model training")
    return table


def _turn_metrics(model: RewardModel, kind: str, split: _UserSplit) -> dict[str, Any]:
    """Gold and style correlations, style sensitivity and (not pairwise) calibration of the
    model's reward on the held-out turns."""
    contexts, replies = as_lists(split.turns_test["context"]), as_lists(split.turns_test["reply"])
    scores = model.score(contexts, replies)
    correlations = style_correlations(scores, replies)
    sensitivity = style_sensitivity(model, contexts, replies)
    metrics: dict[str, Any] = {
        "gold_correlation": {"turns": gold_correlation(scores, split.gold_test).to_dict()},
        "style_correlations": {k: v.to_dict() for k, v in correlations.items()},
        "max_abs_style_r": max_abs_style_correlation(correlations),
        "style_sensitivity": {k: v.to_dict() for k, v in sensitivity.items()},
    }
    if kind != "pairwise":
        probabilities = model.predict_proba(contexts, replies)
        metrics["calibration"] = {
            name: calibration(p, split.turns_test[name].astype(float).to_numpy()).to_dict()
            for name, p in probabilities.items()
        }
    return metrics


def _pairs_gold_agreement(model: RewardModel, comparisons: pd.DataFrame) -> float:
    """Share of held-out pairs the reward orders as the pair's annotator's gold utility does."""
    n = len(comparisons)
    both = model.score(
        as_lists(comparisons["context"]) * 2,
        as_lists(comparisons["reply_a"]) + as_lists(comparisons["reply_b"]),
    )
    return pairwise_gold_agreement(
        both[:n],
        both[n:],
        comparisons["gold_utility_a"].to_numpy(),
        comparisons["gold_utility_b"].to_numpy(),
    )


def _held_out_metrics(model: RewardModel, kind: str, split: _UserSplit) -> dict[str, Any]:
    """Everything the report measures on the held-out users (module docstring)."""
    metrics = _turn_metrics(model, kind, split)
    if split.pairs_test is not None and not split.pairs_test.empty:
        metrics["pairwise_accuracy"] = evaluate_pairwise(model, split.pairs_test).to_dict()
        metrics["gold_correlation"]["pairs_agreement"] = _pairs_gold_agreement(
            model, split.comparisons_test
        )
    return metrics


def _leak_probe_report(
    model: RewardModel, split: _UserSplit, gold_terms: pd.DataFrame, *, seed: int
) -> dict[str, Any]:
    """:func:`leak_probe` of the model's inputs on the turns ``gold_terms`` holds (by position)."""
    rows = gold_terms.index.to_numpy()
    contexts, replies = split.examples["context"].iloc[rows], split.examples["reply"].iloc[rows]
    return leak_probe(rm_inputs(model, contexts, replies), gold_terms, seed=seed).to_dict()


def train_and_evaluate(
    turns: pd.DataFrame,
    comparisons: pd.DataFrame | None,
    kind: str,
    backbone: str,
    *,
    style_controlled: bool = False,
    target: str | None = None,
    activity: pd.DataFrame | None = None,
    seed: int = 0,
    test_size: float = 0.2,
    minilm_config: MiniLMConfig | None = None,
    llm_config: LLMConfig | None = None,
    max_eval_rows: int | None = None,
    test_users: set[str] | None = None,
    gold_terms: pd.DataFrame | None = None,
    verbose: bool = False,
) -> tuple[RewardModel, dict[str, Any]]:
    """Fit one reward model on the training users and report on the held-out users.

    Args:
        turns: the run store's turns table (``gold_satisfaction`` included: it is used for
            evaluation only and dropped before training).
        comparisons: the annotators' comparisons (``gold_*`` likewise), or None; required
            for ``kind="pairwise"``, and the source of held-out pairwise accuracy for all.
        kind, backbone, style_controlled: which model (``rewards.rm``).
        target: for ``pointwise``, the logged signal to fit instead of ``engaged``.
        activity: active (user_id, day) rows for next-day return (default: from turns).
        seed: seeds the user split and the model.
        test_size: share of users held out.
        minilm_config, llm_config: backbone settings (their seed is replaced by ``seed``).
        max_eval_rows: score at most this many held-out turns and as many held-out pairs
            (a random sample; None = all). An LLM scores ~1 chat/s on a busy 2-core CPU.
        test_users: hold out exactly these users (``cross_validate``'s folds) instead of a
            random ``test_size`` share.
        gold_terms: the gold terms of some logged turns (:func:`logged_gold_terms`, indexed
            by position in ``turns``); given, the report gains ``leak_probe``: the model's
            inputs on those turns against each term (:func:`leak_probe`, seeded by ``seed``).
        verbose: progress bars.

    Returns:
        The model and the report dict written to ``rm_eval.json``.
    """
    spec = _ModelSpec(kind, backbone, style_controlled, target)
    holdout = _HoldOut(
        seed=seed, test_size=test_size, max_eval_rows=max_eval_rows, test_users=test_users
    )
    _require_comparisons(kind, comparisons)
    split = holdout.split(turns, comparisons, activity)
    train_table = _training_table(kind, split)
    started = time.perf_counter()
    model = spec.fit(
        train_table, seed=seed, minilm_config=minilm_config, llm_config=llm_config, verbose=verbose
    )
    report: dict[str, Any] = {
        **spec.describe(model),
        "seed": seed,
        "train_seconds": time.perf_counter() - started,
        "n_train_rows": len(train_table),
        **split.sizes(),
    }
    started = time.perf_counter()
    report.update(_held_out_metrics(model, kind, split))
    if style_controlled:
        report["style_coefficients"] = model.style_coefficients()
    if gold_terms is not None:
        report["leak_probe"] = _leak_probe_report(model, split, gold_terms, seed=seed)
    report["history"] = model.history
    report["eval_seconds"] = time.perf_counter() - started
    return model, report


def cross_validate(
    turns: pd.DataFrame,
    comparisons: pd.DataFrame | None,
    kind: str,
    backbone: str,
    *,
    folds: int = 5,
    seed: int = 0,
    **options: Any,
) -> dict[str, Any]:
    """``train_and_evaluate`` on ``folds`` user folds; every logged user is held out once.

    Small runs leave few held-out pairs per split (a 200-pair test set has a +-7 point
    interval on accuracy); pooling the folds evaluates every pair and turn out of sample.
    ``options`` go to ``train_and_evaluate`` (``style_controlled``, ``target``, ...).

    Returns ``{"folds": [report, ...], "pooled": {...}}``: pooled pairwise accuracy (with a
    Wilson interval over all held-out pairs) and n-weighted means of the per-fold gold
    correlation, style correlations and style sensitivity.
    """
    if folds < 2:
        raise ValueError(f"cross_validate needs folds >= 2, got {folds}")
    users = set(turns["user_id"].astype(str))
    if comparisons is not None:
        users |= set(comparisons["user_id"].astype(str))
    order = np.random.default_rng(seed).permutation(sorted(users))
    reports = []
    for k in range(folds):
        _, report = train_and_evaluate(
            turns,
            comparisons,
            kind,
            backbone,
            seed=seed + k,
            test_users=set(order[k::folds].tolist()),
            **options,
        )
        reports.append(report)
    pooled = _pooled([_FoldFigures.of(report) for report in reports])
    return {"folds": reports, "pooled": {"model": reports[0]["model"], **pooled}}


@dataclass(frozen=True)
class _FoldFigures:
    """What :func:`cross_validate` pools of one fold's ``train_and_evaluate`` report."""

    train_seconds: float
    n_turns: int  # held-out turns scored
    gold_pearson: float  # on the held-out turns
    style_pearson: dict[str, float]  # per style feature
    style_sensitivity_sd: dict[str, float]  # per style edit, in reward standard deviations
    pairwise: tuple[float, int] | None  # held-out (accuracy, pairs); None: no pairs scored
    pairs_agreement: float | None  # share of held-out pairs ordered as the gold orders them

    @classmethod
    def of(cls, report: Mapping[str, Any]) -> _FoldFigures:
        """The figures of a report (the layout of ``rm_eval.json``)."""
        accuracy = report.get("pairwise_accuracy")
        return cls(
            train_seconds=report["train_seconds"],
            n_turns=report["n_test_turns"],
            gold_pearson=report["gold_correlation"]["turns"]["pearson_r"],
            style_pearson={k: v["pearson_r"] for k, v in report["style_correlations"].items()},
            style_sensitivity_sd={
                k: v["mean_delta_sd"] for k, v in report["style_sensitivity"].items()
            },
            pairwise=None if accuracy is None else (accuracy["accuracy"], accuracy["n"]),
            pairs_agreement=report["gold_correlation"].get("pairs_agreement"),
        )


def _weighted(values: list[float], weights: list[int]) -> float:
    """Mean of the finite ``values`` with positive ``weights`` (NaN when there is none)."""
    v, w = np.asarray(values, dtype=float), np.asarray(weights, dtype=float)
    ok = np.isfinite(v) & (w > 0)
    return float(np.average(v[ok], weights=w[ok])) if ok.any() else float("nan")


def _pooled(figures: list[_FoldFigures]) -> dict[str, Any]:
    """The folds' figures pooled: turn-weighted means, and pairwise accuracy over all pairs
    with its Wilson interval (when the folds scored pairs)."""
    n_turns = [f.n_turns for f in figures]
    first = figures[0]
    pooled: dict[str, Any] = {
        "folds": len(figures),
        "train_seconds_mean": float(np.mean([f.train_seconds for f in figures])),
        "gold_pearson_turns": _weighted([f.gold_pearson for f in figures], n_turns),
        "style_pearson": {
            name: _weighted([f.style_pearson[name] for f in figures], n_turns)
            for name in first.style_pearson
        },
        "style_sensitivity_sd": {
            name: _weighted([f.style_sensitivity_sd[name] for f in figures], n_turns)
            for name in first.style_sensitivity_sd
        },
        "n_turns": int(sum(n_turns)),
    }
    if first.pairwise is None:
        return pooled
    pairs = [f.pairwise for f in figures]  # the folds of one run all score pairs, or none
    n_pairs = [n for _, n in pairs]
    correct = sum(accuracy * n for accuracy, n in pairs)
    low, high = proportion_confint(correct, sum(n_pairs), alpha=0.05, method="wilson")
    pooled["pairwise_accuracy"] = {
        "accuracy": correct / sum(n_pairs),
        "ci_low": float(low),
        "ci_high": float(high),
        "n": int(sum(n_pairs)),
    }
    agreement = [f.pairs_agreement for f in figures]
    pooled["gold_pairs_agreement"] = _weighted(agreement, n_pairs)
    return pooled


def rm_train(
    run_dir: str | Path,
    kind: str,
    backbone: str,
    *,
    style_controlled: bool = False,
    target: str | None = None,
    out: str | Path | None = None,
    experiment_id: str | None = None,
    seed: int = 0,
    test_size: float = 0.2,
    minilm_config: MiniLMConfig | None = None,
    llm_config: LLMConfig | None = None,
    max_eval_rows: int | None = None,
    probe_rows: int | None = PROBE_ROWS,
    verbose: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """What ``flywheel rm train`` does: read the run, train, save the model and rm_eval.json.

    ``probe_rows``: the leak probe's sample of logged turns (seeded by ``seed``; None = all,
    0 = no probe). Returns the model folder (``RUN_DIR/artifacts/rm/<name>`` unless
    ``out``) and the report.
    """
    turns, activity, comparisons = load_run_tables(run_dir, experiment_id)
    gold_terms, skipped = None, None
    if probe_rows != 0 and recorded_world(run_dir) is None:
        skipped = "the run records no world to recompute its gold terms in"
    elif probe_rows != 0:
        sample = _sample(np.arange(len(turns)), probe_rows, np.random.default_rng(seed))
        gold_terms = logged_gold_terms(run_dir, turns, rows=sample)
    model, report = train_and_evaluate(
        turns,
        comparisons,
        kind,
        backbone,
        style_controlled=style_controlled,
        target=target,
        activity=activity,
        seed=seed,
        test_size=test_size,
        minilm_config=minilm_config,
        llm_config=llm_config,
        max_eval_rows=max_eval_rows,
        gold_terms=gold_terms,
        verbose=verbose,
    )
    folder = Path(out) if out is not None else Path(run_dir) / "artifacts" / RM_DIR / model.name
    model.save(folder)
    report["run_dir"] = str(run_dir)
    if skipped is not None:
        report["leak_probe"] = {"skipped": skipped}
    (folder / EVAL_FILE).write_text(json.dumps(report, indent=2, default=float))
    return folder, report


def summarize(report: Mapping[str, Any]) -> str:
    """A few human lines from an ``rm_eval.json`` report."""
    lines = [
        f"{report['model']}: trained in {report['train_seconds']:.1f}s on "
        f"{report['n_train_rows']} rows"
    ]
    if "pairwise_accuracy" in report:
        acc = report["pairwise_accuracy"]
        lines.append(
            f"  held-out pairwise accuracy {acc['accuracy']:.3f} "
            f"[{acc['ci_low']:.3f}, {acc['ci_high']:.3f}] (n={acc['n']})"
        )
    g = report["gold_correlation"]["turns"]
    lines.append(
        f"  gold correlation (turns) pearson {g['pearson_r']:.3f}, "
        f"spearman {g['spearman_rho']:.3f} (n={g['n']})"
    )
    if "pairs_agreement" in report["gold_correlation"]:
        lines.append(
            f"  gold agreement (pairs) {report['gold_correlation']['pairs_agreement']:.3f}"
        )
    styles = ", ".join(
        f"{k} {v['pearson_r']:+.3f}" for k, v in report["style_correlations"].items()
    )
    lines.append(f"  style correlations (pearson r): {styles}")
    for target, cal in report.get("calibration", {}).items():
        lines.append(
            f"  {target}: AUC {cal['auc']:.3f}, ECE {cal['ece']:.4f}, Brier {cal['brier']:.4f}"
        )
    if "skipped" in report.get("leak_probe", {}):
        lines.append(f"  leak probe skipped: {report['leak_probe']['skipped']}")
    elif "leak_probe" in report:
        probe = report["leak_probe"]
        terms = ", ".join(
            f"{k} {max(v['linear_r2'], v['nonlinear_r2']):.2f}" for k, v in probe["terms"].items()
        )
        verdict = f"LEAKS: {', '.join(probe['leaks'])}" if probe["leaks"] else "no leak"
        lines.append(
            f"  leak probe: R^2 of each gold term from the model's inputs (best of ridge / "
            f"mlp, n={probe['n']}; {verdict} at >= {probe['threshold']}): {terms}"
        )
    return "\n".join(lines)
