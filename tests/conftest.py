"""Shared fixtures and builders: a tiny random Llama with the real SmolLM2 tokenizer, the
tiny scenario files the end-to-end tests run, quiet logs."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

CHARACTERS_DIR = Path(__file__).resolve().parents[1] / "scenarios" / "characters"
BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def save_tiny_llama(path: Path, tokenizer_dir: Path, seed: int) -> Path:
    """Save a random-initialised 2-layer Llama with the tokenizer (and chat template) of
    ``tokenizer_dir`` to ``path``; the same seed saves the same weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real packaged SmolLM2 checkpoint (prepared once per cache)."""
    from policies.models import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A random-initialised 2-layer Llama with SmolLM2's real tokenizer and chat template.

    Fast enough for every test that needs a real forward pass, a real ``generate`` and a
    real trainer step, without the 135M-parameter cost.
    """
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir, seed=0)


def tiny_scenario_toml(
    path: Path,
    *,
    user_model: str | Path,
    name: str = "tiny",
    seed: int = 3,
    max_new_tokens: int = 4,
    temperature: float | None = None,
    world: Mapping[str, Any] | None = None,
    traffic: Mapping[str, Any] | None = None,
    **tables: Any,
) -> Path:
    """Write a tiny scenario file to ``path`` and return ``path``.

    The common shape: the packaged characters, simulated users speaking through
    ``user_model`` in float32, conversations capped at 2 turns, 16 users over 1 pre-day and
    2 test days split evenly between the arms, 720-minute scheduling slots. ``max_new_tokens`` (and
    ``temperature``, when given) size both sides: the users' messages and the bot's
    replies. ``world`` and ``traffic`` are merged into those tables key by key (nested
    tables too); ``tables`` adds top-level keys and tables (``generations``, ``policy``,
    ``recipes``, ``gates``...). A value of None leaves its key out, so the scenario's own
    default applies.
    """
    sampling = {"max_new_tokens": max_new_tokens}
    if temperature is not None:
        sampling["temperature"] = temperature
    defaults = {
        "name": name,
        "seed": seed,
        "world": {
            "characters_dir": str(CHARACTERS_DIR),
            "turn_cap": 2,
            "user_llm": {**sampling, "policy": {"model": str(user_model), "dtype": "float32"}},
        },
        "traffic": {
            "n_users": 16,
            "pre_days": 1,
            "test_days": 2,
            "treatment_share": 0.5,
            "slot_minutes": 720,
            "bot_sampling": sampling,
        },
    }
    overrides = {"world": world or {}, "traffic": traffic or {}, **tables}
    path.write_text(to_toml(merged(defaults, overrides)), encoding="utf-8")
    return path


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``overrides``, nested tables key by key; an override of None
    removes its key (TOML has no null)."""
    result = dict(base)
    for key, value in overrides.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping):
            below = result.get(key)
            result[key] = merged(below if isinstance(below, Mapping) else {}, value)
        else:
            result[key] = value
    return result


def to_toml(document: Mapping[str, Any]) -> str:
    """``document`` as TOML: tables as ``[a.b]`` headers, lists of tables as ``[[a]]``."""
    return "\n".join(_table_lines(document, ())) + "\n"


def _table_lines(table: Mapping[str, Any], path: tuple[str, ...], array: bool = False) -> list[str]:
    """The lines of one table: its header, its keys, then its sub-tables."""
    header = ".".join(_key(part) for part in path)
    lines = [f"[[{header}]]" if array else f"[{header}]"] if path else []
    nested = {k: v for k, v in table.items() if isinstance(v, Mapping) or _is_table_list(v)}
    lines += [f"{_key(k)} = {_value(v)}" for k, v in table.items() if k not in nested]
    for key, value in nested.items():
        for item in value if isinstance(value, list) else [value]:
            lines += ["", *_table_lines(item, (*path, key), array=isinstance(value, list))]
    return lines


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _key(key: str) -> str:
    return key if BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def _value(value: Any) -> str:
    """One TOML value; a table inside a list is written inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(
        f"to_toml: {value!r} ({type(value).__name__}) has no TOML form; fix: pass a "
        "bool, int, float, str, Path, list or mapping"
    )
