"""costmodel.step_flops (the whole-step FLOP prediction) against a hand count on a tiny shape,
and its bounds: never above the linear-only ceiling, 1 at keep 1, shrinking with T."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from celora_dist import CELoRAConfig
from celora_dist.costmodel import LLAMA_PROJECTIONS, MODEL_SHAPES, ModelShape, flop_ceiling, step_flops

# hidden 8, intermediate 16, 2 layers, 2 heads of 4 (Q width 8), 1 KV head (K/V width 4), vocab 32.
TINY = ModelShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, vocab=32)
# r = 2, r0 = 1; v and down approximate at keep 0.5 (k = 2 of 4, 4 of 8); head keeps 8 of 32 rows.
CFG = CELoRAConfig(r=2, r0=1, keep={"v_proj": 0.5, "down_proj": 0.5},
                   exact=("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"), head_keep=0.25)


def test_tiny_shape_by_hand():
    # (m, n): q 8x8, k 4x8, v 4x8, o 8x8, gate 16x8, up 16x8, down 8x16
    # sum mn = 64+32+32+64+128+128+128 = 576; sum (m+n) = 16+12+12+16+24+24+24 = 128
    f = step_flops(TINY, CFG, seq_len=10)
    L = 2
    assert f.frozen_fwd == L * 2 * 576
    assert f.dx_dense == L * 2 * 576
    # exact q,k,o,gate,up: 2*(64+32+64+128+128) = 832
    # v: 2n(k+r0) + 2(m-k)r0 = 2*8*(2+1) + 2*(4-2)*1 = 52; down: 2*16*(4+1) + 2*(8-4)*1 = 168
    assert f.dx_celora == L * (832 + 52 + 168)
    assert f.lora == L * (2 + 4) * 2 * 128                # forward 2r(m+n) + backward 4r(m+n)
    assert f.attention == L * 3 * (4 * 10 * 8 / 2)         # causal fwd 4*T*8/2, backward 2x fwd
    assert f.head_fwd == 2 * 32 * 8 and f.head_dx_dense == 2 * 32 * 8
    assert f.head_dx_celora == 2 * 8 * 8
    assert f.shrinkable == L * 2 * (32 + 128) + 2 * 32 * 8  # v and down dense dX, + head dX
    assert f.dense == 2304 + 3072 + 960 + 512 + 2304 + 512
    assert f.celora == 2304 + 3072 + 960 + 512 + 2104 + 128
    assert f.ratio == pytest.approx(9664 / 9080)
    assert f.shrinkable_share == pytest.approx(1152 / 9664)

    ck = step_flops(TINY, CFG, seq_len=10, checkpointing=True)
    assert ck.frozen_fwd == 2 * f.frozen_fwd
    assert ck.lora == L * (4 + 4) * 2 * 128
    assert ck.attention == L * 4 * 160
    assert (ck.head_fwd, ck.dx_dense, ck.dx_celora) == (f.head_fwd, f.dx_dense, f.dx_celora)
    assert step_flops(TINY, CFG, 10, causal=False).attention == 2 * f.attention


def test_shape_from_config_and_agreement_with_flop_ceiling():
    hf = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=32, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(hf)
    assert ModelShape.of(model) == ModelShape.of(hf)
    assert (ModelShape.of(hf).projections(), ModelShape.of(hf).vocab) == (TINY.projections(), TINY.vocab)
    f = step_flops(model, CFG, seq_len=10)
    assert (f.dense, f.celora) == (step_flops(TINY, CFG, 10).dense, step_flops(TINY, CFG, 10).celora)
    # flop_ceiling counts the same linears and head; it charges the LoRA (G B) A term of an
    # approximate layer (2nr: v 2*8*2, down 2*16*2) to CE-LoRA's dX, step_flops to the shared LoRA work.
    c = flop_ceiling(model, CFG, include_head=True)
    assert c.dense_flops == f.frozen_fwd + f.head_fwd + f.dx_dense + f.head_dx_dense
    assert c.celora_flops == f.frozen_fwd + f.head_fwd + f.dx_celora + f.head_dx_celora + 2 * (32 + 64)


def released_variants():
    all_auto = {name: "auto" for name in LLAMA_PROJECTIONS}
    return [CELoRAConfig(), CELoRAConfig(head_keep=0.1), CELoRAConfig(keep=all_auto, exact=()),
            CELoRAConfig(keep=all_auto, exact=(), head_keep=0.1)]


@pytest.mark.parametrize("model", list(MODEL_SHAPES))
def test_step_ratio_below_linear_ceiling_and_falls_with_T(model):
    for cfg in released_variants():
        for ckpt in (False, True):
            ratios = []
            for T in (512, 2048, 4096):
                f = step_flops(MODEL_SHAPES[model], cfg, T, ckpt)
                assert 1.0 < f.ratio <= f.linear_ratio
                assert 0.0 < f.shrinkable_share < 0.5
                ratios.append(f.ratio)
            assert ratios == sorted(ratios, reverse=True)  # attention's share grows with T


def test_ratio_tends_to_one_as_keep_tends_to_one():
    shape = MODEL_SHAPES["llama-3-8b"]
    every = {name: 1.0 for name in LLAMA_PROJECTIONS}
    exact = step_flops(shape, CELoRAConfig(keep=every, exact=(), head_keep=1.0), 2048)
    assert exact.ratio == 1.0 and exact.linear_ratio == 1.0
    gaps = []
    for keep in (0.3, 0.6, 0.9, 0.99, 0.999):
        cfg = CELoRAConfig(keep={name: keep for name in LLAMA_PROJECTIONS}, exact=(), head_keep=keep)
        gaps.append(abs(step_flops(shape, cfg, 2048).ratio - 1.0))
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.01
    # auto keeps are costed at the stand-in auto_keep
    auto = CELoRAConfig(keep={name: "auto" for name in LLAMA_PROJECTIONS}, exact=())
    fixed = CELoRAConfig(keep={name: 0.6 for name in LLAMA_PROJECTIONS}, exact=())
    assert step_flops(shape, auto, 2048, auto_keep=0.6).ratio == step_flops(shape, fixed, 2048).ratio
    assert step_flops(shape, auto, 2048, auto_keep=1.0).ratio == 1.0


def test_scale_on_paper_script(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "scale_on_paper.py"
    spec = importlib.util.spec_from_file_location("scale_on_paper", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--models", "llama-3-70b", "--seq-lens", "512", "4096"])
    assert len(rows) == 2 * 2 * 5  # T x checkpointing x configs
    assert all(1.0 < r["step_ratio"] <= r["linear_ceiling"] for r in rows)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("|")]
    assert lines[0] == "| " + " | ".join(bench.COLUMNS) + " |" and len(lines) == 2 + len(rows)
    bench.main(["--models", "smollm2-135m", "--seq-lens", "512", "--wide"])
    wide = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("|")]
    assert len(wide) == 2 + 2 and "released+head" in wide[0] and "fast" in wide[0]
    # the fast column is the preset costed at the keep its auto layers settled at
    from celora_dist import preset
    fast = [r for r in bench.rows(["llama-3-8b"], [2048], 0.1, 0.6, fast_keep=0.5) if r["config"] == "fast"]
    assert fast[0]["step_ratio"] == step_flops(MODEL_SHAPES["llama-3-8b"], preset("fast"), 2048, False,
                                               auto_keep=0.5).ratio
