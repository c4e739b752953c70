"""CE-QLoRA (celora_dist/quant/) against independent references.

References: bitsandbytes' own whole-weight dequantization (the row gather must equal it bit for
bit), PEFT's QLoRA layers (``peft.tuners.lora.bnb.Linear4bit`` / ``Linear8bitLt``) on the same
stored bytes, the CE-LoRA dX formula written out in float64 on the dequantized weight, and
CE-LoRA on a dense ``nn.Linear`` holding that dequantized weight.

Tolerances, relative Frobenius error ``‖a − b‖ / ‖b‖``: fp32 paths 1e-5 (both sides compute the
same products in fp32, in different orders: a few units of fp32's 2^-24 times √n); bf16 autocast
against PEFT 1e-2 (both round the product and the LoRA branch in bf16, 2^-8, differently; a
missing term is off by O(1)). A model's logits through another module tree (PEFT adapter,
merged dense model): 1e-5, the same fp32 reordering. bitsandbytes is a test dependency
(scripts/install.sh): it is imported directly, so a missing install fails rather than skips.
"""
from __future__ import annotations

import copy
import math
import warnings

import bitsandbytes as bnb
import bitsandbytes.functional as bF
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import bnb as peft_bnb
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from celora_dist import CELoRAConfig, CELoRALinear, for_trainer, inject_celora, merge_celora, on_optimizer_step
from celora_dist.adapters import peft_lora_config, save_adapter
from celora_dist.config import EXACT
from celora_dist.layer import celora_layers
from celora_dist.quant import bnb as Q
from celora_dist.quant.layer import CELoRAQuantLinear

from .conftest import decaying_weight, tiny_llama

FP32 = 1e-5
BF16_VS_PEFT = 1e-2
M, N = 96, 128  # 64 | N: whole 4-bit blocks per row, so rows are gathered (see the test of 64 ∤ n)


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.detach().double()
    return float((actual.detach().double() - expected).norm() / expected.norm())


def linear4bit(m: int = M, n: int = N, quant_type: str = "nf4", double_quant: bool = True, bias: bool = True,
               blocksize: int = 64, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A bitsandbytes 4-bit linear on the CPU over a weight with an LLM-like decaying spectrum."""
    torch.manual_seed(seed)
    lin = bnb.nn.Linear4bit(n, m, bias=bias, compute_dtype=torch.float32, quant_type=quant_type,
                            compress_statistics=double_quant)
    w = (decaying_weight(m, n, seed=seed) * 4).to(dtype)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, blocksize=blocksize,
                                   compress_statistics=double_quant)
    if bias:
        with torch.no_grad():
            lin.bias.normal_(0, 0.1)
    return lin.to("cpu")


def linear8bit(m: int = M, n: int = N, seed: int = 0, has_fp16_weights: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    lin = bnb.nn.Linear8bitLt(n, m, has_fp16_weights=has_fp16_weights, threshold=0.0)
    lin.weight = bnb.nn.Int8Params(decaying_weight(m, n, seed=seed) * 4, requires_grad=False,
                                   has_fp16_weights=has_fp16_weights)
    with torch.no_grad():
        lin.bias.normal_(0, 0.1)
    return lin.to("cpu")


def quantized(kind: str, **kw) -> nn.Module:
    return linear8bit(**kw) if kind == "int8" else linear4bit(quant_type=kind, **kw)


class OneProj(nn.Module):
    """One quantized linear called ``proj``, flagged the way PEFT tells a bitsandbytes model
    (``is_loaded_in_4bit`` / ``_8bit``: without it PEFT wraps the layer as a plain lora.Linear)."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj
        self.is_loaded_in_8bit = Q.quant_type(proj) == "int8"
        self.is_loaded_in_4bit = not self.is_loaded_in_8bit

    def forward(self, x):
        return self.proj(x)


def make_layer(base: nn.Module, keep: float = 0.5, r: int = 4, alpha: float = 8.0, r0: int = 4,
               refresh_every: int = 3, lora_weights=None, seed: int = 1) -> CELoRAQuantLinear:
    """A CE-QLoRA layer with a non-zero B (so every LoRA term of every gradient is exercised)."""
    if lora_weights is None:
        g = torch.Generator().manual_seed(seed)
        lora_weights = (torch.randn(r, base.in_features, generator=g) / math.sqrt(base.in_features),
                        torch.randn(base.out_features, r, generator=g) * 0.1)
    return CELoRAQuantLinear(base, r=r, alpha=alpha, rslora=True, r0=r0, keep=keep, refresh_every=refresh_every,
                             svd=EXACT, lora_weights=tuple(t.clone() for t in lora_weights))


def backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """One forward/backward with upstream gradient ``grad``; returns (y, dX)."""
    x = x.detach().clone().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    y = module(x)
    y.backward(grad.to(y.dtype))
    return y, x.grad


# -- 1. row dequantization -----------------------------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_row_dequantization_equals_dequantize_then_gather(quant_type, double_quant):
    lin = linear4bit(m=97, n=128, quant_type=quant_type, double_quant=double_quant)  # odd m
    assert Q.rows_gatherable(lin)
    whole = Q.dequantize(lin)
    assert whole.shape == (97, 128) and whole.dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    for k in (1, 40, 97):
        rows = torch.randperm(97, generator=g)[:k]  # unsorted: any order of rows
        assert torch.equal(Q.dequantize_rows(lin, rows), whole[rows])
        assert torch.equal(Q.dequantize_rows(lin, rows.sort().values), whole[rows.sort().values])
    rows = torch.tensor([0, 5, 96])
    assert torch.equal(Q.dequantize_rows(lin, rows, torch.bfloat16), Q.dequantize(lin, torch.bfloat16)[rows])


@pytest.mark.parametrize("blocksize, dtype", [(128, torch.float32), (64, torch.bfloat16)])
def test_row_dequantization_other_block_size_and_dtype(blocksize, dtype):
    lin = linear4bit(m=64, n=256, blocksize=blocksize, dtype=dtype)
    assert Q.dense_dtype(lin) == dtype
    rows = torch.tensor([63, 2, 31])
    out = Q.dequantize_rows(lin, rows)
    assert out.dtype == dtype and torch.equal(out, Q.dequantize(lin)[rows])


def test_row_dequantization_without_whole_blocks_per_row_warns_once(monkeypatch):
    monkeypatch.setattr(Q, "_warned_whole", set())
    lin = linear4bit(m=97, n=100)  # 64 does not divide 100: a row's blocks straddle rows
    assert not Q.rows_gatherable(lin)
    whole = Q.dequantize(lin)
    rows = torch.tensor([3, 0, 96, 50])
    with pytest.warns(RuntimeWarning, match="does not divide"):
        assert torch.equal(Q.dequantize_rows(lin, rows, name="blk.proj"), whole[rows])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per layer
        assert torch.equal(Q.dequantize_rows(lin, rows[:1], name="blk.proj"), whole[rows[:1]])


def test_int8_rows():
    lin = linear8bit(m=97, n=128)
    whole = Q.dequantize(lin)
    # independent of bitsandbytes' dequantization: row i is CB[i]·SCB[i]/127
    by_hand = lin.weight.data.float() * lin.weight.SCB.float()[:, None] / 127
    assert torch.allclose(whole, by_hand, rtol=1e-6, atol=0)
    for rows in (torch.tensor([96]), torch.randperm(97)[:40], torch.arange(97)):
        assert torch.equal(Q.dequantize_rows(lin, rows), whole[rows])


# -- 2. keep = 1 equals PEFT's QLoRA --------------------------------------------------

def peft_qlora_twin(base: nn.Module, r: int = 4, alpha: float = 8.0):
    """(CE-QLoRA keep=1 layer on ``base``, PEFT QLoRA on a copy of it, PEFT's layer), same A, B."""
    peft_model = get_peft_model(OneProj(copy.deepcopy(base)),
                                LoraConfig(r=r, lora_alpha=alpha, use_rslora=True, target_modules=["proj"],
                                           lora_dropout=0.0))
    proj = peft_model.base_model.model.proj
    expected = peft_bnb.Linear8bitLt if Q.quant_type(base) == "int8" else peft_bnb.Linear4bit
    assert type(proj) is expected
    with torch.no_grad():
        proj.lora_B["default"].weight.normal_(0, 0.1)
    layer = make_layer(base, keep=1.0, r=r, alpha=alpha,
                       lora_weights=(proj.lora_A["default"].weight.detach(), proj.lora_B["default"].weight.detach()))
    assert layer.is_exact and layer.scaling == pytest.approx(proj.scaling["default"])
    assert layer.lora_A.weight.dtype == proj.lora_A["default"].weight.dtype == torch.float32
    # both sides read the same stored bytes and scales
    assert torch.equal(proj.base_layer.weight.data, layer.base_layer.weight.data)
    assert Q.quant_digest(proj.base_layer) == Q.quant_digest(layer.base_layer)
    return layer, peft_model, proj


def loss_and_grads(module: nn.Module, x: torch.Tensor, target: torch.Tensor, autocast: torch.dtype | None = None):
    x = x.detach().clone().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = module(x)
    loss = ((y.float() - target) ** 2).mean()
    loss.backward()  # outside autocast, as Trainer/accelerate do
    return y, loss, x.grad


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_keep_one_equals_peft_qlora_fp32(kind):
    layer, peft_model, proj = peft_qlora_twin(quantized(kind))
    x, target = torch.randn(2, 5, N), torch.randn(2, 5, M)
    y, loss, dX = loss_and_grads(layer, x, target)
    y_ref, loss_ref, dX_ref = loss_and_grads(peft_model, x, target)
    assert y.dtype == y_ref.dtype == dX.dtype == dX_ref.dtype == torch.float32
    assert rel(y, y_ref) < FP32 and rel(loss, loss_ref) < FP32 and rel(dX, dX_ref) < FP32
    assert rel(layer.lora_A.weight.grad, proj.lora_A["default"].weight.grad) < FP32
    assert rel(layer.lora_B.weight.grad, proj.lora_B["default"].weight.grad) < FP32


def test_keep_one_equals_peft_qlora_under_bf16_autocast():
    """Values within bf16 tolerance, LoRA gradients in their fp32 master dtype on both sides.

    The output dtypes differ by design: PEFT's QLoRA layer returns bitsandbytes' fp32 product
    plus its LoRA term cast back to fp32; CE-QLoRA returns the autocast dtype, as CE-LoRA does."""
    layer, peft_model, proj = peft_qlora_twin(linear4bit())
    x, target = torch.randn(2, 5, N), torch.randn(2, 5, M)
    y, loss, dX = loss_and_grads(layer, x, target, autocast=torch.bfloat16)
    y_ref, loss_ref, dX_ref = loss_and_grads(peft_model, x, target, autocast=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and dX.dtype == dX_ref.dtype == torch.float32
    assert rel(y, y_ref) < BF16_VS_PEFT and rel(loss, loss_ref) < BF16_VS_PEFT and rel(dX, dX_ref) < BF16_VS_PEFT
    for ours, theirs in ((layer.lora_A.weight, proj.lora_A["default"].weight),
                         (layer.lora_B.weight, proj.lora_B["default"].weight)):
        assert ours.grad.dtype == theirs.grad.dtype == torch.float32
        assert rel(ours.grad, theirs.grad) < BF16_VS_PEFT


# -- 3. the approximate backward is the written-out formula ----------------------------

@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_approximate_backward_equals_formula_on_dequantized_weight(kind):
    layer = make_layer(quantized(kind), keep=0.5, refresh_every=3)
    x = torch.randn(3, 7, N)
    backward(layer, x, torch.randn(3, 7, M))  # step 0: refresh (exact dX, scores)
    layer.finish_step()
    assert layer.selected is not None and layer.selected.numel() == M // 2 and not layer.refresh_due()

    grad = torch.randn(3, 7, M)
    _, dX = backward(layer, x, grad)
    G, X = grad.reshape(-1, M).double(), x.reshape(-1, N).double()
    W = Q.dequantize(layer.base_layer).double()
    I, s = layer.selected, layer.scaling
    A, B = layer.lora_A.weight.detach().double(), layer.lora_B.weight.detach().double()
    B0_dropped = layer.B0.detach().double().clone()
    B0_dropped[I] = 0
    expected = G[:, I] @ W[I] + (G @ B0_dropped) @ layer.A0.detach().double() + s * (G @ B) @ A
    assert rel(dX.reshape(expected.shape), expected) < FP32
    assert rel(layer.lora_A.weight.grad, s * (G @ B).T @ X) < FP32
    assert rel(layer.lora_B.weight.grad, s * G.T @ (X @ A.T)) < FP32
    # the approximation is in use: the exact dX is far from it
    assert rel(dX.reshape(expected.shape), G @ W + s * (G @ B) @ A) > 1e-3


# -- 4. the schedule of a dense base holding the dequantized weight --------------------

def test_same_schedule_as_dense_base_of_the_dequantized_weight():
    lin = linear4bit()
    dense = nn.Linear(N, M)
    with torch.no_grad():
        dense.weight.copy_(Q.dequantize(lin))
        dense.bias.copy_(lin.bias)
    quant = make_layer(lin, keep=0.5, refresh_every=2)
    ref = CELoRALinear(dense, r=4, alpha=8.0, rslora=True, r0=4, keep=0.5, refresh_every=2, svd=EXACT,
                       lora_weights=(quant.lora_A.weight.detach().clone(), quant.lora_B.weight.detach().clone()))
    assert quant.B0.dtype == ref.B0.dtype == torch.float32
    assert rel(quant.B0, ref.B0) < FP32 and rel(quant.A0, ref.A0) < FP32
    assert rel(quant.ws_row_sq, ref.ws_row_sq) < FP32
    g = torch.Generator().manual_seed(3)
    for step in range(5):  # refresh on steps 0, 2, 4
        x, grad = torch.randn(2, 6, N, generator=g), torch.randn(2, 6, M, generator=g)
        y, dX = backward(quant, x, grad)
        y_ref, dX_ref = backward(ref, x, grad)
        assert rel(y, y_ref) < FP32 and rel(dX, dX_ref) < FP32, step
        assert rel(quant.lora_A.weight.grad, ref.lora_A.weight.grad) < FP32
        assert rel(quant.lora_B.weight.grad, ref.lora_B.weight.grad) < FP32
        quant.finish_step()
        ref.finish_step()
        assert quant.selected is not None and torch.equal(quant.selected, ref.selected), step


# -- 5. an approximate step dequantizes only the kept rows ------------------------------

class Calls:
    """Counts calls of a library function and what they dequantize (the result is the function's)."""

    def __init__(self, fn, size):
        self.fn, self.size, self.sizes = fn, size, []

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.sizes.append(self.size(args, out))
        return out


@pytest.fixture
def spies(monkeypatch):
    spies = {"whole": Calls(Q.dequantize, lambda a, out: out.shape[0]),
             "rows": Calls(Q.dequantize_rows, lambda a, out: a[1].numel()),
             # every 4-bit element bitsandbytes dequantizes, by whatever path
             "elements": Calls(bF.dequantize_4bit, lambda a, out: out.numel())}
    monkeypatch.setattr(Q, "dequantize", spies["whole"])
    monkeypatch.setattr(Q, "dequantize_rows", spies["rows"])
    monkeypatch.setattr(bF, "dequantize_4bit", spies["elements"])
    return spies


def counted_backward(layer, spies):
    """Forward, then one backward with the spies' records reset in between: what the backward dequantizes."""
    x = torch.randn(4, N, requires_grad=True)
    y = layer(x)
    for spy in spies.values():
        spy.sizes.clear()
    y.backward(torch.randn_like(y))
    return {name: list(spy.sizes) for name, spy in spies.items()}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_approximate_step_dequantizes_only_kept_rows(kind, spies):
    layer = make_layer(quantized(kind), keep=0.25, refresh_every=3)
    k = layer.k
    assert k == M // 4
    whole = M * N if kind != "int8" else None
    seen = counted_backward(layer, spies)  # step 0: refresh, nothing selected yet: the exact dX
    assert seen["whole"] == [M] and seen["rows"] == []
    layer.finish_step()
    for _ in (1, 2):  # approximate steps
        seen = counted_backward(layer, spies)
        assert seen["whole"] == [] and seen["rows"] == [k]
        if whole:
            assert seen["elements"] == [k * N]
        layer.finish_step()
    seen = counted_backward(layer, spies)  # step 3: refresh: exact dX, plus the estimate whose error is measured
    assert seen["whole"] == [M] and seen["rows"] == [k]
    if whole:
        assert sorted(seen["elements"]) == [k * N, whole]


def test_exact_layer_dequantizes_the_whole_weight(spies):
    layer = make_layer(linear4bit(), keep=1.0)
    for _ in range(2):
        seen = counted_backward(layer, spies)
        assert seen["whole"] == [M] and seen["rows"] == [] and seen["elements"] == [M * N]
        layer.finish_step()


# -- 6. a 4-bit Llama ----------------------------------------------------------------

CFG = dict(keep={"v_proj": 0.5, "o_proj": 0.5, "up_proj": 0.5, "down_proj": 0.5}, r=4, r0=4, refresh_every=2,
           svd="exact")
APPROX = ("v_proj", "o_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(hidden_size=128, intermediate_size=192).save_pretrained(d)  # 64 | every in_features
    return d


def load_4bit(directory) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        directory, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.float32))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    # train mode (dropout is 0 in the tiny Llama): bitsandbytes' Linear4bit, in eval mode under no_grad
    # on an AVX512-BF16 CPU, repacks its weight and rounds its scales to bf16 (0.50.2), so an eval-mode
    # PEFT reference would differ by bf16 roundings rather than fp32 ones
    model.train()
    return model(input_ids=ids).logits


def test_inject_celora_trains_saves_and_merges_a_4bit_llama(llama_dir, tmp_path):
    model = prepare_model_for_kbit_training(load_4bit(llama_dir), use_gradient_checkpointing=False)
    inject_celora(model, CELoRAConfig(**CFG), verbose=False)
    layers = dict(celora_layers(model))
    assert len(layers) == 14 and all(type(m) is CELoRAQuantLinear for m in layers.values())
    assert all(m.is_exact == (not name.endswith(APPROX)) for name, m in layers.items())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and all("lora_" in n for n in before)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 16), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):  # refresh, approximate, refresh
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        on_optimizer_step(model)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)

    model.eval()  # CE-QLoRA's forward is bitsandbytes' product in either mode
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    adapter = save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(load_4bit(llama_dir), str(adapter))
    reference = logits(peft_model, ids)
    assert rel(ours, reference) < FP32

    # merged into the fp32 dequantized weights (not re-quantized): the same model up to fp32 rounding
    merged = merge_celora(model)
    assert not any(Q.is_quantized(m) or isinstance(m, CELoRALinear) for m in merged.modules())
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert rel(logits(merged, ids), reference) < FP32


def test_split_of_a_quantized_layer_is_cached_under_its_stored_bytes(llama_dir, tmp_path):
    """A second start on the same 4-bit base reads every split from the cache, bit for bit; the key is the
    quantized storage's digest, so the same weights quantized as FP4 are a miss."""
    cfg = CELoRAConfig(**{**CFG, "svd": "randomized"})
    first = inject_celora(load_4bit(llama_dir), cfg, verbose=False, factor_cache=tmp_path)
    second = inject_celora(load_4bit(llama_dir), cfg, verbose=False, factor_cache=tmp_path)
    assert first.celora_summary["svd_computed"] == 8 and second.celora_summary["svd_cached"] == 8
    for (name, a), (_, b) in zip(celora_layers(first), celora_layers(second)):
        if not a.is_exact:
            assert torch.equal(a.B0, b.B0) and torch.equal(a.A0, b.A0), name
    fp4 = AutoModelForCausalLM.from_pretrained(llama_dir, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32))
    assert inject_celora(fp4, cfg, verbose=False, factor_cache=tmp_path).celora_summary["svd_cached"] == 0


def test_for_trainer_on_a_4bit_llama_equals_peft_qlora_and_round_trips(llama_dir, tmp_path):
    cfg = CELoRAConfig(**CFG)
    peft_model, _ = for_trainer(prepare_model_for_kbit_training(load_4bit(llama_dir), use_gradient_checkpointing=False),
                                cfg, verbose=False, factor_cache=None)
    assert isinstance(peft_model, PeftModel)
    targets = {n: m for n, m in peft_model.named_modules() if n.endswith(tuple(cfg.target_modules))}
    assert len(targets) == 14
    for name, module in targets.items():
        if name.endswith(APPROX):
            # PEFT's QLoRA layer around our r = 0 layer: its merge knows the 4-bit storage
            assert type(module) is peft_bnb.Linear4bit and type(module.base_layer) is CELoRAQuantLinear
            assert module.base_layer.r == 0 and not module.base_layer.is_exact
        else:
            assert type(module) is peft_bnb.Linear4bit

    # step 0 is a refresh step (exact dX): PEFT's own QLoRA with the same adapter weights is the reference
    reference = get_peft_model(prepare_model_for_kbit_training(load_4bit(llama_dir), use_gradient_checkpointing=False),
                               peft_lora_config(cfg, list(cfg.target_modules)))
    ref_params = dict(reference.named_parameters())
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
            if p.requires_grad:
                ref_params[n].copy_(p)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    peft_model.train()
    reference.train()
    loss, loss_ref = peft_model(input_ids=ids, labels=ids).loss, reference(input_ids=ids, labels=ids).loss
    loss.backward()
    loss_ref.backward()
    assert math.isfinite(loss.item()) and rel(loss, loss_ref) < FP32
    trained = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trained) == 2 * 14
    for n, p in trained:
        assert rel(p.grad, ref_params[n].grad) < FP32, n

    ours = logits(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(load_4bit(llama_dir), str(tmp_path / "adapter"))
    assert rel(logits(reloaded, ids), ours) < FP32

    # merge_and_unload as for any PEFT QLoRA model: W0' = quantize(deq(W0) + s·B A), plain bitsandbytes
    # layers left (the stored bytes of PEFT's own re-quantization of the same sum, bit for bit)
    layer = peft_model.base_model.model.model.layers[0].mlp.up_proj
    inner = layer.base_layer.base_layer
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    expected = Q.dequantize(inner, torch.float32) + delta
    merged = peft_model.merge_and_unload()
    up = merged.model.layers[0].mlp.up_proj
    assert type(up) is bnb.nn.Linear4bit and not any(isinstance(m, CELoRALinear) for m in merged.modules())
    requantized = bnb.nn.Params4bit(expected, requires_grad=False, quant_type="nf4", compress_statistics=True).to("cpu")
    assert torch.equal(up.weight.data, requantized.data)


# -- 7. bad input ----------------------------------------------------------------------

def test_int8_with_fp16_weights_is_refused_naming_the_layer():
    lin = linear8bit(has_fp16_weights=True)
    with pytest.raises(ValueError, match=r"blk\.up_proj: LLM\.int8 layer with has_fp16_weights=True"):
        CELoRAQuantLinear(lin, r=4, keep=0.5, name="blk.up_proj")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj = lin

    # through inject_celora: refused before any SVD split is computed
    with pytest.raises(ValueError, match=r"up_proj: LLM\.int8 layer with has_fp16_weights=True"):
        inject_celora(Block(), CELoRAConfig(keep={"up_proj": 0.5}, exact=(), r=4, r0=4), verbose=False)


def test_quant_layer_on_a_dense_linear_is_a_type_error():
    with pytest.raises(TypeError, match="bitsandbytes-quantized linear, got Linear"):
        CELoRAQuantLinear(nn.Linear(N, M), r=4, name="blk.proj")


def test_a_4bit_weight_repacked_for_cpu_inference_is_refused_naming_the_layer():
    """bitsandbytes' eval-mode, no-grad forward on an AVX512-BF16 CPU rewrites the storage (another byte
    layout, bf16 scales): reading it as stored would silently give wrong rows and products."""
    lin = linear4bit()
    if lin.support_avx512bf16_for_cpu:  # the way a user's inference before conversion does it
        lin.eval()
        with torch.no_grad():
            lin(torch.randn(2, N))
    else:  # elsewhere the same conversion that forward applies
        lin.weight.data, lin.weight.quant_state = bF._convert_weight_packed_for_cpu(lin.weight.data,
                                                                                     lin.weight.quant_state)
    assert lin.weight.quant_state.packing_format_for_cpu
    with pytest.raises(ValueError, match="blk.up_proj: this 4-bit weight was repacked"):
        CELoRAQuantLinear(lin, r=4, keep=0.5, name="blk.up_proj")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj = lin

    with pytest.raises(ValueError, match="up_proj: this 4-bit weight was repacked"):
        inject_celora(Block(), CELoRAConfig(keep={"up_proj": 0.5}, exact=(), r=4, r0=4), verbose=False)
