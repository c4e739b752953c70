"""FLOP ceilings against docs/design.md's hand-computed numbers; benchmark scripts smoke-run."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from celora_dist import CELoRAConfig
from celora_dist.costmodel import flop_ceiling, layer_flops

ROOT = Path(__file__).resolve().parents[1]


def meta_llama(hidden, inter, layers, heads, kv, vocab, tie=True):
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=inter,
                                            num_hidden_layers=layers, num_attention_heads=heads,
                                            num_key_value_heads=kv, vocab_size=vocab,
                                            tie_word_embeddings=tie))


def test_layer_flops_formula():
    fwd, dx = layer_flops(m=100, n=50, keep=0.55, r0=14, r=14)
    assert fwd == 2 * 100 * 50
    assert dx == 2 * 50 * (55 + 14 + 14) + 2 * (100 - 55) * 14
    assert layer_flops(100, 50, 1.0, 14, 14) == (10000.0, 10000.0)


@pytest.mark.parametrize("shape,ckpt,head_keep,expected", [
    # docs/design.md §3: base-linear FLOPs fall to ~0.88x (no checkpointing), ~0.93x (with)
    ((4096, 11008, 32, 32, 32, 32000, False), False, None, 1 / 0.887),
    ((4096, 11008, 32, 32, 32, 32000, False), True, None, 1 / 0.924),
    # docs/design.md §5 end-to-end (head counted): SmolLM2-135M 1.09x, ~1.21x with the head at 10%;
    # LLaMA-3.2-1B 1.10x -> ~1.23x
    ((576, 1536, 30, 9, 3, 49152, True), False, "exact", 1.09),
    ((576, 1536, 30, 9, 3, 49152, True), False, 0.1, 1.21),
    ((2048, 8192, 16, 32, 8, 128256, True), False, "exact", 1.10),
    ((2048, 8192, 16, 32, 8, 128256, True), False, 0.1, 1.23),
])
def test_ceilings_match_design_numbers(shape, ckpt, head_keep, expected):
    model = meta_llama(*shape)
    include_head = head_keep is not None
    cfg = CELoRAConfig(head_keep=head_keep if isinstance(head_keep, float) else None)
    ratio = flop_ceiling(model, cfg, checkpointing=ckpt, include_head=include_head).ratio
    assert ratio == pytest.approx(expected, abs=0.012)


def run_smoke(script: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def table(stdout: str) -> tuple[list[str], list[list[str]]]:
    lines = [l for l in stdout.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]
    return header, rows


def finite(cell: str) -> bool:
    try:
        return math.isfinite(float(cell.rstrip("x%")))
    except ValueError:
        return False


def test_head_benchmark_smoke():
    header, rows = table(run_smoke("head_backward.py"))
    assert header == ["shape", "V", "d", "T", "keep", "k", "dense_ms", "sparse_ms", "speedup", "ceiling",
                      "of_ceiling", "rel_err"]
    assert len(rows) == 3
    for row in rows:
        assert all(finite(c) for c in row[1:]), row
        assert 0 < float(row[-1]) < 1  # approximation error is real and bounded


def test_end_to_end_benchmark_smoke():
    header, rows = table(run_smoke("end_to_end.py"))
    assert header[:7] == ["method", "fwd_ms", "bwd_ms", "step_ms", "step_iqr_ms", "tokens_per_s", "speedup"]
    assert "ceiling" in header and "act_mem_mb" in header
    assert [r[0] for r in rows] == ["peft-lora-r16", "celora-released", "celora-auto"]
    for row in rows:
        cells = dict(zip(header, row))
        for col in ("fwd_ms", "bwd_ms", "step_ms", "step_iqr_ms", "tokens_per_s", "speedup", "ceiling",
                    "act_mem_mb"):
            assert finite(cells[col]), (col, row)
