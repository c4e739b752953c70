"""Shared helpers: tiny models, PEFT twins and gradient capture."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
# The suite checks the approximation's math, so it pins the approximate torch backend (the
# trainers' subprocesses inherit it). Under the default "auto" a layer may measure that the
# approximation does not pay on these tiny shapes and run exact; that choice has its own
# tests (tests/test_backend_choice.py), which set "auto" themselves.
os.environ.setdefault("CELORA_KERNEL", "torch")

import pytest
import torch
from torch import nn

from .train_utils import TINY_FLAGS, make_assets, run_train, show


class OneLinear(nn.Module):
    """A module with one linear called ``proj`` — the unit PEFT and we both wrap."""

    def __init__(self, n: int, m: int, bias: bool = True, dtype=torch.float32):
        super().__init__()
        self.proj = nn.Linear(n, m, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


def decaying_weight(m: int, n: int, decay: float = 0.15, seed: int = 0) -> torch.Tensor:
    """A weight with a geometrically decaying spectrum, like trained LLM projections."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
    S = torch.exp(-decay * torch.arange(min(m, n), dtype=torch.float32)) + 0.05
    return (U * S) @ V.T


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture
def llama():
    return tiny_llama()


# ---- trainer tests (tests/test_train_*.py): shared assets and single-process reference runs ----

@pytest.fixture(scope="package")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("train_assets"))


@pytest.fixture(scope="package")
def single_celora(assets, tmp_path_factory):
    """CE-LoRA, mc data, micro-batch 8 on one rank: also the reference of the 2-rank runs
    (same global batches as micro-batch 4 x 2 ranks). Checkpoints at 5, 10, 15 and 20, of which
    --save-total-limit keeps the newest two (saving does not touch the numerics)."""
    out = tmp_path_factory.mktemp("single_celora")
    proc = run_train(["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS,
                      "--max-steps", "20", "--refresh-every", "4", "--micro-batch", "8",
                      "--save-every", "5", "--save-total-limit", "2",
                      "--output-dir", str(out), "--dump-celora-state"])
    assert proc.returncode == 0, show(proc)
    return out, proc


@pytest.fixture(scope="package")
def single_lora(assets, tmp_path_factory):
    """--method lora on the alpaca file, micro-batch 8 (reference of the 2-rank ZeRO-3 LoRA run)."""
    out = tmp_path_factory.mktemp("single_lora")
    proc = run_train(["--model", str(assets["model"]), "--data", str(assets["alpaca"]), *TINY_FLAGS,
                      "--method", "lora", "--max-steps", "20", "--micro-batch", "8", "--output-dir", str(out)])
    assert proc.returncode == 0, show(proc)
    return out, proc
