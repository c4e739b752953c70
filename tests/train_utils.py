"""Helpers for the trainer tests: a tiny Llama + tokenizer on disk, synthetic task files,
and ``launch/train.py`` in real processes (single process or ``deepspeed --num_gpus 2``)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from celora_dist.train.engine import free_port  # noqa: F401 (the tests' port, the trainer's rule)

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
CRASH_AT_SAVE = REPO / "tests" / "crash_at_save.py"  # launch/train.py with a crash in one checkpoint save
WORDS = ["red", "blue", "green", "cat", "dog", "fish", "run", "jump", "swim", "big", "small", "fast"]


def mc_rows(n: int, seed: int = 0) -> list[dict]:
    """PIQA-shaped rows; the answer is A when the question starts with a colour word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
        label = "A" if q[0] in ("red", "blue", "green") else "B"
        opts = [" ".join(rng.choice(WORDS) for _ in range(2)) for _ in range(2)]
        rows.append({"question": " ".join(q), "options": f"A. {opts[0]}\nB. {opts[1]}",
                     "answer": f"{label}. {opts['AB'.index(label)]}"})
    return rows


def alpaca_rows(n: int, seed: int = 1) -> list[dict]:
    """Alpaca-shaped rows: repeat the input's last word twice."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        rows.append({"instruction": "repeat the last word twice", "input": " ".join(words),
                     "output": f"{words[-1]} {words[-1]}"})
    return rows


def make_tokenizer(out: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    extra = ["Question", "Answer", "Context", "Instruction", "Input", "Response", "repeat", "the", "last",
             "word", "twice", "yes", "no", "or", "A", "B", "C", "D", "E", ":", ".", "#", "###", "?", "(", ")"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + extra)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    return fast


def make_assets(root: Path) -> dict[str, Path]:
    """tiny Llama + tokenizer folder, a PIQA-shaped file and an alpaca file under ``root``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "tiny-llama"
    tok = make_tokenizer(model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, initializer_range=0.2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    mc = root / "mc.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in mc_rows(480)))
    alpaca = root / "alpaca.json"
    alpaca.write_text(json.dumps(alpaca_rows(400), indent=1))
    return {"model": model_dir, "mc": mc, "alpaca": alpaca}


# Small CE-LoRA shapes for the tiny model (v_proj has 32 outputs: r0 must stay below that).
TINY_FLAGS = ["--r", "4", "--alpha", "8", "--r0", "4", "--seq-len", "64", "--lr", "3e-3",
              "--lr-schedule", "constant", "--max-grad-norm", "0", "--mc-format", "letter"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
             PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # The checkout under test wins over any other install of celora_dist.
    e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    return e


def run_train(args: list[str], nproc: int = 1, timeout: int = 240, extra_env: dict | None = None,
              port: int | None = None, script: Path = TRAIN) -> subprocess.CompletedProcess:
    """Run launch/train.py (or ``script``, a wrapper of it such as CRASH_AT_SAVE); ``nproc`` > 1
    goes through DeepSpeed's launcher."""
    if nproc == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
               "--master_port", str(port or free_port()), str(script), *args]
    e = env()
    e.update(extra_env or {})
    return subprocess.run(["timeout", "-k", "10", str(timeout), *cmd], cwd=REPO, env=e,
                          capture_output=True, text=True)


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(output_dir) if "loss" in r and "eval" not in r]


def steps_logged(output_dir: Path) -> int:
    """Training steps in metrics.jsonl so far (0 before the file exists)."""
    try:
        return len(train_losses(output_dir))
    except (FileNotFoundError, ValueError):
        return 0


def wait_for_steps(proc: subprocess.Popen, output_dir: Path, steps: int, log: Path, timeout: float = 180) -> None:
    """Poll until a background run has logged ``steps`` steps; fails (with the log's tail) if it
    exits or overruns first."""
    import time

    deadline = time.time() + timeout
    while steps_logged(output_dir) < steps:
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:] if log.exists() else ""
        time.sleep(0.2)


def show(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


def assert_same_adapter(a_dir: Path, b_dir: Path, atol: float = 1e-7) -> None:
    """The PEFT adapters two runs wrote hold the same tensors (a resume reproduces a straight run)."""
    import torch
    from safetensors.torch import load_file

    a = load_file(Path(a_dir) / "adapter" / "adapter_model.safetensors")
    b = load_file(Path(b_dir) / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=atol, msg=key)


def assert_losses_match(straight_dir: Path, rows: list[dict], atol: float = 1e-6) -> None:
    """Each metrics row of a resumed run has the straight run's loss for the same step."""
    import pytest

    expected = {r["step"]: r["loss"] for r in read_metrics(straight_dir) if "eval" not in r}
    for r in rows:
        assert r["loss"] == pytest.approx(expected[r["step"]], rel=0, abs=atol), r["step"]


def dumped_factors(output_dir: Path, rank: int) -> dict:
    """{layer: (B0, A0, ‖Ws[i, :]‖²)} one rank of a --dump-celora-state run trained with."""
    import torch

    return torch.load(Path(output_dir) / "celora_state" / f"factors_rank{rank}.pt", weights_only=False)


def one_process_factors(model_dir: Path, r0: int = 4) -> dict:
    """The reference: the same model's factors from one process that factorises every layer
    itself (no torch.distributed, no cache), with TINY_FLAGS' r0 and the released keeps."""
    import torch
    from transformers import AutoModelForCausalLM

    from celora_dist import CELoRAConfig, inject_celora
    from celora_dist.layer import celora_layers

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inject_celora(model, CELoRAConfig(r=4, alpha=8, r0=r0), verbose=False, distribute=False)
    return {name: (layer.B0.detach().clone(), layer.A0.detach().clone(), layer.ws_row_sq.clone())
            for name, layer in celora_layers(model) if layer.B0 is not None}


def assert_close_factors(got: tuple, want: tuple, name: str) -> None:
    """Equal up to LAPACK threading (the trainer runs 1 thread per rank, the test process 2)."""
    import torch

    for part, g, w in zip(("B0", "A0", "ws_row_sq"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {part}: {m}")
