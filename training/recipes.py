"""The recipes behind ``flywheel train sft|dpo|grpo``: logged turns in, checkpoint out.

Each takes the turns DataFrame ``flywheel/`` read from the run store and what it knows of
the characters (system prompts; checkers for the steerability reward), curates the turns
(``training.curation``) and runs one TRL trainer on the curated *train* split. The
held-out users are kept for evaluation and never trained on.

- SFT: the curated replies themselves.
- DPO: for each curated context, ``n`` replies of the starting model scored by the
  reward model (when given), the steerability checkers and the artifact penalty; best
  vs worst of each context (``training.rejection``).
- GRPO: the curated contexts as prompts, rewards as in DPO but online.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rewards.checkers import Checker
from training.curation import CuratedData, CurationConfig, curate, sft_records
from training.models import model_config

# Replies sampled per context for DPO pairs; contexts used to fit the reference style.
DPO_SAMPLES = 4
REFERENCE_PROMPTS = 128


def curated(turns: pd.DataFrame, system_prompts: Mapping[str, str], seed: int) -> CuratedData:
    """Curate ``turns`` with the default filters, split by user with ``seed``."""
    data = curate(turns, np.random.default_rng(seed), CurationConfig(), system_prompts)
    if data.train.empty:
        raise ValueError(
            f"curation kept no training examples from {len(turns)} logged replies "
            f"({data.dropped}); log more traffic or relax training.curation.CurationConfig"
        )
    return data


def _reference(model: str, prompts: Sequence[Any], characters: Sequence[str], seed: int) -> Any:
    from training.grpo import reference_style

    k = min(len(prompts), REFERENCE_PROMPTS)
    return reference_style(model, prompts[:k], characters[:k], seed=seed)


def run_sft(
    turns: pd.DataFrame,
    system_prompts: Mapping[str, str],
    model: str,
    out: str | Path,
    steps: int,
    seed: int = 0,
    use_peft: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """SFT on the curated train split; returns the merged checkpoint folder."""
    from training.sft import sft_config, train_sft

    data = curated(turns, system_prompts, seed)
    args = sft_config(Path(out) / "trainer", max_steps=steps, seed=seed, **(overrides or {}))
    return train_sft(sft_records(data.train), model_config(model, use_peft=use_peft), args, out)


def run_dpo(
    turns: pd.DataFrame,
    system_prompts: Mapping[str, str],
    checkers: Mapping[str, Sequence[Checker]],
    model: str,
    out: str | Path,
    steps: int,
    scorer: Any | None = None,
    seed: int = 0,
    use_peft: bool = True,
    max_new_tokens: int = 48,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """DPO on best/worst pairs of the starting model's own replies to curated contexts."""
    from policies import PolicySpec, SamplingParams, load_policy
    from training.dpo import dpo_config, train_dpo
    from training.grpo import build_rewards
    from training.rejection import preference_records, sample_candidates, score_candidates

    data = curated(turns, system_prompts, seed)
    # One context per pair each step: more contexts than steps x batch would not be seen.
    contexts = data.train.head(max(steps * 4, 8))
    prompts, characters = list(contexts["prompt"]), list(contexts["character"])
    reference = _reference(model, prompts, characters, seed)
    policy = load_policy(PolicySpec(model=model, dtype="auto"))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.9, seed=seed)
    candidates = sample_candidates(policy, prompts, characters, DPO_SAMPLES, params)
    del policy
    scored = score_candidates(candidates, build_rewards(checkers, reference, scorer))
    args = dpo_config(Path(out) / "trainer", max_steps=steps, seed=seed, **(overrides or {}))
    return train_dpo(preference_records(scored), model_config(model, use_peft=use_peft), args, out)


def run_grpo(
    turns: pd.DataFrame,
    system_prompts: Mapping[str, str],
    checkers: Mapping[str, Sequence[Checker]],
    model: str,
    out: str | Path,
    steps: int,
    scorer: Any | None = None,
    seed: int = 0,
    use_peft: bool = True,
    overrides: Mapping[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
    hold_rates: Sequence[str] = (),
) -> Path:
    """GRPO on the curated contexts with the reward model (if any), steerability and the
    artifact penalty against the starting model's style; each ``hold_rates`` feature
    (``"emoji"``) held at its rate in the logged train replies (``RateConstraint``)."""
    from training.grpo import build_rewards, grpo_config, grpo_records, train_grpo
    from training.rewards import held_rates

    data = curated(turns, system_prompts, seed)
    prompts, characters = list(data.train["prompt"]), list(data.train["character"])
    reference = _reference(model, prompts, characters, seed)
    constraints = held_rates(hold_rates, list(data.train["completion"]), characters, checkers)
    rewards = build_rewards(checkers, reference, scorer, held=[c.feature for c in constraints])
    args = grpo_config(Path(out) / "trainer", max_steps=steps, seed=seed, **(overrides or {}))
    return train_grpo(
        grpo_records(prompts, characters),
        [*rewards, *constraints],
        model_config(model, use_peft=use_peft),
        args,
        out,
        callbacks=callbacks,
    )
