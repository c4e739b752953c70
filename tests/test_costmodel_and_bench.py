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
from celora_dist.costmodel import (LLAMA_PROJECTIONS, ModelShape, dequant_cost, dequant_elements, flop_ceiling,
                                   layer_flops, step_dequant)

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


def _pair(cost):
    return cost.elements, cost.bytes_read


def test_dequant_cost_formula():
    """Per backward: QLoRA dequantizes all m·n weights, CE-QLoRA k·n; bytes = the rows' 4-bit codes
    (1/2 byte each) + their fp32 absmax (1 per 64) + the whole double-quantized absmax (uint8 codes
    + an fp32 scale per 256 of them), written out for m=256, n=128, keep 0.55 (k = 141)."""
    m, n, k = 256, 128, 141
    assert dequant_elements(m, n, None) == dequant_elements(m, n, 1.0) == m * n
    assert dequant_elements(m, n, 0.55) == k * n
    nested = m * n / 64 + 4 * m * n / (64 * 256)
    assert _pair(dequant_cost(m, n, None)) == (m * n, m * n / 2 + 4 * m * n / 64 + nested)
    assert _pair(dequant_cost(m, n, 0.55)) == (k * n, k * n / 2 + 4 * k * n / 64 + nested)
    assert dequant_cost(m, n, 0.55, double_quant=False).bytes_read == k * n / 2 + 4 * k * n / 64
    assert dequant_cost(m, n, 0.55, blocksize=128, double_quant=False).bytes_read == k * n / 2 + 4 * k * n / 128
    assert _pair(dequant_cost(m, n, 0.55, bits=8)) == (k * n, k * n + 4 * k)  # int8 rows + fp32 row scales
    with pytest.raises(ValueError, match="bits"):
        dequant_cost(m, n, 0.5, bits=3)


def test_step_dequant_by_hand():
    """One decoder layer of hidden 64, intermediate 128, kv 32 (heads 4, kv heads 2), the released
    keeps (v/o 0.55, up/down 0.65, q/k/gate exact): every projection is dequantized whole in each
    forward pass and in QLoRA's backward; CE-QLoRA's backward dequantizes k rows of v/o/up/down."""
    shape = ModelShape(hidden=64, intermediate=128, layers=3, heads=4, kv_heads=2, vocab=100)
    full = {"q": 64 * 64, "k": 32 * 64, "v": 32 * 64, "o": 64 * 64, "gate": 128 * 64, "up": 128 * 64,
            "down": 64 * 128}
    kept = {"q": 64 * 64, "k": 32 * 64, "v": 18 * 64, "o": 36 * 64, "gate": 128 * 64, "up": 84 * 64,
            "down": 42 * 128}  # ceil(0.55·32) = 18, ceil(0.55·64) = 36, ceil(0.65·128) = 84, ceil(0.65·64) = 42
    cfg = CELoRAConfig()
    d = step_dequant(shape, cfg)
    assert d.forward == d.backward_qlora == 3 * sum(full.values())
    assert d.backward_celora == 3 * sum(kept.values())
    assert d.ratio == pytest.approx(2 * sum(full.values()) / (sum(full.values()) + sum(kept.values())))
    assert d.backward_ratio == pytest.approx(sum(full.values()) / sum(kept.values()))
    nested = lambda mn: mn / 64 + 4 * mn / (64 * 256)  # noqa: E731
    read = lambda rows_n, mn: rows_n / 2 + 4 * rows_n / 64 + nested(mn)  # noqa: E731
    assert d.bytes_qlora == pytest.approx(3 * sum(read(v, v) for v in full.values()))
    assert d.bytes_celora == pytest.approx(3 * sum(read(kept[p], full[p]) for p in full))
    ckpt = step_dequant(shape, cfg, checkpointing=True)
    assert ckpt.forward == 2 * d.forward and ckpt.backward_celora == d.backward_celora
    # a refresh step: the exact dX (all rows) and the estimate of the indices in use (k rows)
    approx = ("v", "o", "up", "down")
    assert step_dequant(shape, cfg, refresh=True).backward_celora == 3 * (
        sum(full.values()) + sum(kept[p] for p in approx))
    auto = CELoRAConfig(keep={p: "auto" for p in ("v_proj", "o_proj")}, exact=())
    fixed = CELoRAConfig(keep={p: 0.5 for p in ("v_proj", "o_proj")}, exact=())
    assert step_dequant(shape, auto, auto_keep=0.5) == step_dequant(shape, fixed)


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
                      "of_ceiling", "rel_err", "corr_ms", "corr_rel_err"]
    assert len(rows) == 3
    for row in rows:
        assert all(finite(c) for c in row[1:]), row
        rel_err, corr_rel_err = float(row[header.index("rel_err")]), float(row[-1])
        assert 0 < rel_err < 1 and 0 < corr_rel_err < 1  # approximation error is real and bounded


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


def test_scale_on_paper_qlora_rows(capsys):
    """bench/scale_on_paper.py --qlora: one row per model, T and CE-QLoRA config, each the cost
    model's step_dequant beside its step_flops ratio (T changes the FLOP ratio, not dequantization)."""
    import importlib.util

    from celora_dist import preset
    from celora_dist.costmodel import MODEL_SHAPES, step_flops

    spec = importlib.util.spec_from_file_location("scale_on_paper", ROOT / "bench" / "scale_on_paper.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--qlora", "--models", "llama-3-8b", "--seq-lens", "512", "2048", "--fast-keep", "0.5"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("|")]
    assert lines[0] == "| " + " | ".join(bench.QLORA_COLUMNS) + " |" and len(lines) == 2 + len(rows) == 2 + 4
    shape = MODEL_SHAPES["llama-3-8b"]
    fast = {r["T"]: r for r in rows if r["config"] == "fast"}
    d = step_dequant(shape, preset("fast"), auto_keep=0.5)
    for T, row in fast.items():
        assert row["deq_qlora_G"] == d.qlora / 1e9 and row["deq_celora_G"] == d.celora / 1e9
        assert row["bwd_deq_ratio"] == d.backward_ratio > row["deq_ratio"] > 1.0
        assert row["step_ratio"] == step_flops(shape, preset("fast"), T, auto_keep=0.5).ratio
    assert fast[512]["deq_ratio"] == fast[2048]["deq_ratio"] and fast[512]["step_ratio"] != fast[2048]["step_ratio"]


def test_step_dequant_is_what_the_4bit_backwards_dequantize(tmp_path, monkeypatch):
    """costmodel.step_dequant's backward terms against what runs: the weights bitsandbytes'
    ``dequantize_4bit`` returns during one backward of a 4-bit tiny LLaMA — PEFT QLoRA (bitsandbytes'
    MatMul4Bit backward) all m·n per projection; CE-QLoRA m·n on step 0 (no indices yet), k·n on its
    approximate layers between refreshes, (m + k)·n on a later refresh step."""
    import bitsandbytes.functional as bF
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from celora_dist import inject_celora, on_optimizer_step

    from .conftest import tiny_llama

    base = tiny_llama(hidden_size=128, intermediate_size=192)  # in_features multiples of the block size 64
    base.save_pretrained(tmp_path)
    shape = ModelShape.of(base)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)

    def four_bit():
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model.enable_input_require_grads()  # layer 0's q/k/v need their dX too, as the cost model counts
        return model

    seen: list[int] = []
    original = bF.dequantize_4bit

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(bF, "dequantize_4bit", counting)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))

    def backward_elements(model) -> int:
        loss = model(input_ids=ids, labels=ids).loss
        seen.clear()
        loss.backward()
        return sum(seen)

    cfg = CELoRAConfig(refresh_every=2, svd="exact")  # exact: the randomized split's QRs are slow on loaded cores
    peft = get_peft_model(four_bit(), LoraConfig(r=8, target_modules=list(LLAMA_PROJECTIONS)))
    assert backward_elements(peft) == step_dequant(shape, cfg).backward_qlora
    ce = four_bit()
    inject_celora(ce, cfg, verbose=False)
    counts = []
    for _ in range(3):  # step 0 refresh (no indices yet), step 1 approximate, step 2 refresh
        counts.append(backward_elements(ce))
        on_optimizer_step(ce)
    d, refresh = step_dequant(shape, cfg), step_dequant(shape, cfg, refresh=True)
    assert counts == [d.backward_qlora, d.backward_celora, refresh.backward_celora]
    assert d.backward_celora < d.backward_qlora < refresh.backward_celora
