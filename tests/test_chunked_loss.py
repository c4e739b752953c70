"""Chunked LM-head loss (celora_dist/chunked_loss.py, chunked_forward.py) against Hugging Face's own
path (full logits, then ``ForCausalLMLoss``) on the same model: loss, LoRA gradients, the vocab-sparse
head's indices, dH and error telemetry, ignore_index, num_items_in_batch, mixed precision, and that no
(T, V) tensor is ever allocated.

Tolerances: fp32 rtol 1e-5 per tensor and per element (the chunked path sums the loss and the column
scores in another order); bf16 2e-2 per tensor in relative norm, and no farther from the fp32 gradients
than HF's own bf16 path (one bf16 rounding of G and dH, as HF's path has).

The test data are the same in every process: LoRA B is drawn from a seed of the parameter's name by
CRC-32 (Python's str hash changes with PYTHONHASHSEED, which made this file pass or fail by chance)."""
from __future__ import annotations

import copy
import inspect
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import celora_dist.chunked_loss as chunked_loss_module
import celora_dist.head as head_module
from celora_dist import CELoRAConfig, for_trainer, inject_celora, on_optimizer_step, telemetry
from celora_dist.layer import celora_layers
from celora_dist.chunked_forward import (SUPPORTED, disable_chunked_loss, enable_chunked_loss, is_chunked,
                                         unsupported_reason)
from celora_dist.chunked_loss import chunked_lm_head_loss

from .conftest import tiny_llama

SMALL = dict(r=4, r0=4, alpha=8, refresh_every=3)
CHUNK = 5  # several chunks over the 3 x 12 micro-batch's counted tokens


def batch(seed: int = 1, vocab: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels with an ignored prompt span, and one sequence (longer than a chunk) fully ignored."""
    ids = torch.randint(0, vocab, (3, 12), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1] = -100
    labels[2, 4:7] = -100
    return ids, labels


def trained_like(model):
    """LoRA B nonzero, so every LoRA parameter gets a nonzero gradient; the same draw in every process."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    return model.train()


def twins(head_keep=None, method="celora", **model_kw):
    cfg = CELoRAConfig(**SMALL, head_keep=head_keep) if method == "celora" else \
        CELoRAConfig(**SMALL, keep={}, exact=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"), head_keep=head_keep)
    ref = trained_like(inject_celora(tiny_llama(**model_kw), cfg, verbose=False))
    chunked = copy.deepcopy(ref)
    enable_chunked_loss(chunked, CHUNK)
    return ref, chunked


def loss_and_grads(model, ids, labels, autocast=False, **kw):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def step_both(ref, chunked) -> None:
    """Advance both schedules; the chunked twin then takes the reference's indices. The two G's differ by
    fp32 rounding, which can flip a near-tied score of a layer's top-k between runs (2 threads: the
    reduction order varies) — the layers' selection is not what this file tests (the head's is, below)."""
    on_optimizer_step(ref)
    on_optimizer_step(chunked)
    twins = dict(celora_layers(chunked))
    for name, layer in celora_layers(ref):
        if not layer.is_exact:
            twins[name].set_selected(layer.selected)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def assert_same_grads(got, want, rtol=1e-5, elementwise=True):
    """Per tensor ‖got − want‖ ≤ rtol ‖want‖; elementwise (fp32) also |got − want| ≤ rtol (|want| + max |want|):
    a reordered sum errs by the size of its terms, not of its result, so an element that cancels to ~0 is
    off by ~eps x its terms (measured: 1.5e-7 on an element of 3e-3 in a 0.25-max tensor, rel norm 6.5e-7)."""
    assert got.keys() == want.keys() and want
    for name in want:
        a, b = got[name].float(), want[name].float()
        error = relative_error(a, b)
        assert error <= rtol, (name, error)
        if elementwise:
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item(), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method,head_keep", [("lora", None), ("celora", None), ("celora", 1.0)])
def test_loss_and_lora_grads_equal_the_full_logits_path(method, head_keep):
    ref, chunked = twins(head_keep, method)
    ids, labels = batch()
    for step in range(4):  # CE-LoRA: refresh (exact) and approximate steps of the layers
        out_ref, g_ref = loss_and_grads(ref, ids, labels)
        out, g = loss_and_grads(chunked, ids, labels)
        assert out.logits is None and out_ref.logits.shape == (3, 12, 128)
        torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-6, atol=0)
        assert_same_grads(g, g_ref)
        step_both(ref, chunked)


def _recording(monkeypatch, module) -> list[torch.Tensor]:
    calls = []
    original = module.topk_indices

    def record(scores, k, *args, **kwargs):
        calls.append(original(scores, k, *args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(module, "topk_indices", record)
    return calls


def test_vocab_sparse_head_same_indices_dh_and_telemetry(monkeypatch):
    """Scores summed over every chunk before the top-k: the unchunked head's indices and dH, on approximate
    and measuring steps (refresh_every 3: steps 0-3 measure, 4 and 5 approximate), and the same measured error."""
    ref, chunked = twins(head_keep=0.2)
    assert ref.lm_head.tail_correction and chunked.lm_head.tail_correction  # the default: corrected dH
    picked_all = _recording(monkeypatch, head_module)  # both paths select through head.select_rows
    picked_ref, picked = picked_all[0::2], picked_all[1::2]
    ids, labels = batch()
    dh = {}
    for model in (ref, chunked):
        model.model.norm.register_forward_hook(lambda m, i, o: o.retain_grad() or dh.__setitem__(id(m), o))
    for step in range(6):
        _, g_ref = loss_and_grads(ref, ids, labels)
        _, g = loss_and_grads(chunked, ids, labels)
        picked_ref, picked = picked_all[0::2], picked_all[1::2]
        assert len(picked_ref) == len(picked) == step + 1
        assert torch.equal(picked[-1], picked_ref[-1]) and picked[-1].numel() == ref.lm_head.k
        torch.testing.assert_close(dh[id(chunked.model.norm)].grad, dh[id(ref.model.norm)].grad, rtol=1e-5, atol=1e-8)
        assert_same_grads(g, g_ref)
        step_both(ref, chunked)
    want, got = telemetry(ref)["lm_head"], telemetry(chunked)["lm_head"]
    assert want["step"] == got["step"] == 3 and 0 < want["rel_error"] < 1
    assert got["rel_error"] == pytest.approx(want["rel_error"], rel=1e-5)


def _chunked_sparse_backward(head, base) -> tuple:
    """(hidden with its chunked-path .grad, labels, G, W): 2 x 20 tokens of a 200-row head at chunk 4,
    6 prompt tokens ignored, on an approximate step; G is autograd's float64 logit gradient of the same loss."""
    head.step = 3  # an approximate step
    hidden = torch.randn(2, 20, 16, requires_grad=True)
    labels = torch.randint(0, 200, (2, 20))
    labels[0, 3:9] = -100
    chunked_lm_head_loss(hidden, head, labels, chunk=4).backward()
    h = hidden.detach().double().requires_grad_(True)
    logits = h @ base.weight.double().t()
    G = torch.autograd.grad(F.cross_entropy(logits[:, :-1].reshape(-1, 200), labels[:, 1:].reshape(-1)), logits)[0]
    return hidden, labels, G.reshape(-1, 200), base.weight.detach().double()


def test_sparse_dh_is_the_top_k_rows_of_the_whole_batch_score():
    """Independent of the unchunked head: dH = G[:, I] W[I] with I the top-k of ‖G[:, v]‖·‖W[v]‖ over
    ALL tokens (float64 reference from autograd's G), where a per-chunk selection would differ."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 200, bias=False)
    head = head_module.VocabSparseLMHead(base, keep=0.1, measure_every=1000, tail_correction=False)
    hidden, labels, G, W = _chunked_sparse_backward(head, base)
    top = torch.topk(G.norm(dim=0) * W.norm(dim=1), head.k).indices
    torch.testing.assert_close(hidden.grad.double().reshape(-1, 16), G[:, top] @ W[top], rtol=1e-5, atol=1e-7)
    predicting = G.reshape(2, 20, 200)[:, :-1].reshape(-1, 200)  # the positions that predict labels[:, 1:]
    first_chunk = predicting[labels[:, 1:].reshape(-1) != -100][:4]  # the first chunk's 4 counted tokens
    assert set(torch.topk(first_chunk.norm(dim=0) * W.norm(dim=1), head.k).indices.tolist()) != set(top.tolist())


def test_tail_corrected_dh_over_chunks_is_the_whole_batch_formula():
    """With the tail correction (the default) the chunked dH is G[:, S] W[S] + c_t m with S, the column sums
    g and so m taken over the WHOLE batch (float64 reference, written out in tests/test_head.py), labels kept
    first (more label rows than k here: ties to the lower index, the tail weights clamped at 0)."""
    from .test_head import _anisotropic_head, corrected_dh

    torch.manual_seed(0)
    base = _anisotropic_head(vocab=200, d=16)
    head = head_module.VocabSparseLMHead(base, keep=0.1, measure_every=1000)
    hidden, labels, G, W = _chunked_sparse_backward(head, base)
    score = (G.norm(dim=0) * W.norm(dim=1)).masked_fill(G.amin(dim=0) < 0, float("inf"))
    top = torch.sort(score, descending=True, stable=True).indices[:head.k]
    torch.testing.assert_close(hidden.grad.double().reshape(-1, 16), corrected_dh(G, W, top), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(hidden.grad.double().reshape(-1, 16), G[:, top] @ W[top], atol=1e-4)


def test_ignore_index_num_items_and_shift_labels():
    ref, chunked = twins()
    ids, labels = batch()
    for kw in ({"num_items_in_batch": torch.tensor(9)}, {"num_items_in_batch": 13}):
        out_ref, g_ref = loss_and_grads(ref, ids, labels, **kw)
        out, g = loss_and_grads(chunked, ids, labels, **kw)
        torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-6, atol=0)
        assert_same_grads(g, g_ref)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    out, g = loss_and_grads(chunked, ids, None, shift_labels=shifted)
    out_ref, g_ref = loss_and_grads(ref, ids, labels)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-6, atol=0)
    assert_same_grads(g, g_ref)
    # a micro-batch with no counted token: HF's mean is nan, its sum over num_items 0 with zero gradients
    none = torch.full_like(labels, -100)
    assert torch.isnan(chunked(input_ids=ids, labels=none).loss) and torch.isnan(ref(input_ids=ids, labels=none).loss)
    out, g = loss_and_grads(chunked, ids, none, num_items_in_batch=4)
    assert out.loss.item() == 0.0 and all(not t.any() for t in g.values())


def test_trainable_head_with_bias_gets_exact_weight_and_bias_grads():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[1, :4] = -100
    chunked_lm_head_loss(hidden, head, labels, chunk=3).backward()
    got = hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    hidden.grad = head.weight.grad = head.bias.grad = None
    logits = head(hidden)
    F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1)).backward()
    for a, b in zip(got, (hidden.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_gemma2_softcapped_logits():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, max_position_embeddings=64, final_logit_softcapping=3.0)
    ref = trained_like(inject_celora(Gemma2ForCausalLM(cfg), CELoRAConfig(**SMALL, head_keep=0.3), verbose=False))
    chunked = enable_chunked_loss(copy.deepcopy(ref), CHUNK)
    ids, labels = batch()
    for step in range(2):  # a measuring step of the head, then an approximate one
        out_ref, g_ref = loss_and_grads(ref, ids, labels)
        out, g = loss_and_grads(chunked, ids, labels)
        torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-6, atol=0)
        assert_same_grads(g, g_ref)
        step_both(ref, chunked)


@pytest.mark.parametrize("head_keep", [None, 0.2])
def test_bf16_autocast_and_bf16_weights(head_keep):
    """Under CPU autocast (fp32 master weights) and with bf16 weights (the trainer's --dtype bf16): bf16
    logits, fp32 loss, as HF's path; loss within bf16 rounding. Gradients per tensor: within 2e-2 of HF's
    path in relative norm (bf16's eps is 7.8e-3; the two round G and dH once each, in other chunk shapes:
    measured up to 5.6e-3), and no farther from the fp32 model's gradients than HF's own bf16 path is
    (x 1.25 + 2e-3; measured ratios 0.99-1.13 at errors of 1-4 %). Elementwise bf16 bounds do not hold
    for either path: an element near 0 differs by 100 % between the two."""
    ref, chunked = twins(head_keep)
    ids, labels = batch()
    _, g_fp32 = loss_and_grads(ref, ids, labels)
    for cast in ("autocast", "weights"):
        if cast == "weights":
            ref, chunked = ref.to(torch.bfloat16), chunked.to(torch.bfloat16)
        out_ref, g_ref = loss_and_grads(ref, ids, labels, autocast=cast == "autocast")
        out, g = loss_and_grads(chunked, ids, labels, autocast=cast == "autocast")
        assert out.loss.dtype == out_ref.loss.dtype == torch.float32
        assert all(t.dtype == (torch.bfloat16 if cast == "weights" else torch.float32) for t in g.values())
        torch.testing.assert_close(out.loss, out_ref.loss, rtol=4e-3, atol=0)
        assert_same_grads(g, g_ref, rtol=2e-2, elementwise=False)
        for name in g_ref:
            hf_error = relative_error(g_ref[name], g_fp32[name])
            assert relative_error(g[name], g_fp32[name]) <= 1.25 * hf_error + 2e-3, (cast, name, hf_error)


def _largest_allocation(model, ids, labels) -> int:
    """Bytes of the largest single allocation any op made in one forward + backward (torch profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(input_ids=ids, labels=labels).loss.backward()
    return max(e.self_cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("head_keep", [None, 0.2])
def test_no_tensor_of_tokens_times_vocab_is_allocated_or_saved(head_keep):
    """Peak memory without timing: with V = 4096 over 2 x 64 tokens the largest allocation of the chunked
    path is one (chunk, V) fp32 block; today's path allocates (T, V) (so this check can fail), and no tensor
    autograd saves for backward has T x V elements."""
    vocab, chunk = 4096, 16
    ref = trained_like(inject_celora(tiny_llama(vocab_size=vocab), CELoRAConfig(**SMALL, head_keep=head_keep),
                                     verbose=False))
    chunked = enable_chunked_loss(copy.deepcopy(ref), chunk)
    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    tokens_by_vocab = ids.numel() * vocab * 4
    assert _largest_allocation(ref, ids, ids) >= tokens_by_vocab
    assert _largest_allocation(chunked, ids, ids) <= chunk * vocab * 4

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = chunked(input_ids=ids, labels=ids).loss
    loss.backward()
    assert saved and max(saved) < ids.numel() * vocab // 8


def test_other_calls_keep_the_original_forward_and_disable_restores_it():
    ref, chunked = twins()
    ids, labels = batch()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        assert torch.equal(chunked(input_ids=ids).logits, want)  # no labels
        # the original forward on the same call (a GEMM of 3 rows need not equal 3 rows of a 12-row one)
        assert torch.equal(chunked(input_ids=ids, logits_to_keep=3).logits, ref(input_ids=ids, logits_to_keep=3).logits)
        chunked.eval()
        evaluated = chunked(input_ids=ids, labels=labels)  # eval mode: logits for the caller's metrics
        assert torch.equal(evaluated.logits, want)
        chunked.train()
        assert chunked(input_ids=ids, labels=labels).logits is None
        assert chunked(ids, labels=labels, return_dict=False)[0] == chunked(input_ids=ids, labels=labels).loss
    copied = copy.deepcopy(chunked)  # the bound forward follows the copy, not the original
    assert copied.forward.__self__ is copied and is_chunked(copied)
    assert "labels" in inspect.signature(chunked.forward).parameters  # HF Trainer / generate inspect it
    disable_chunked_loss(chunked)
    assert not is_chunked(chunked) and "forward" not in vars(chunked)
    with torch.no_grad():
        assert chunked(input_ids=ids, labels=labels).logits is not None


def test_unsupported_models_and_heads_are_refused():
    from transformers import CohereConfig, CohereForCausalLM

    cohere = CohereForCausalLM(CohereConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1))
    assert "cohere" in unsupported_reason(cohere)
    with pytest.raises(ValueError, match="enable_chunked_loss: .*cohere"):
        enable_chunked_loss(cohere)
    llama = tiny_llama()
    llama.loss_function = lambda **kw: 0
    assert "custom loss_function" in unsupported_reason(llama)
    with pytest.raises(ValueError, match="chunk"):
        enable_chunked_loss(tiny_llama(), 0)
    wrapped = tiny_llama()
    wrapped.lm_head = torch.nn.Sequential(wrapped.lm_head)
    assert "Sequential" in unsupported_reason(wrapped)


def test_trainer_turns_it_on_where_exact_and_notes_where_not(capsys):
    """launch/train.py's --loss-chunk: on for a supported model, a note (and HF's path) for another, off at 0."""
    from transformers import CohereConfig, CohereForCausalLM

    from celora_dist.train.model import chunk_loss

    llama = tiny_llama()
    chunk_loss(llama, 0, verbose=True)
    assert not is_chunked(llama)
    chunk_loss(llama, 64, verbose=True)
    assert is_chunked(llama) and llama.celora_loss_chunk == 64
    cohere = CohereForCausalLM(CohereConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1))
    chunk_loss(cohere, 64, verbose=True)
    assert not is_chunked(cohere)
    out = capsys.readouterr().out
    assert "LM-head loss: 64 counted tokens per chunk" in out
    assert "note: --loss-chunk: CohereForCausalLM (model_type 'cohere')" in out and "full-logits path" in out


def test_supported_families_still_have_the_forward_it_reproduces():
    """The transformers source of every SUPPORTED family: body `self.model(...)`, `self.lm_head(hidden_states)`,
    then only the softcap the list names, then `self.loss_function(...)`; a change fails here."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for model_type, softcap in SUPPORTED.items():
        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        assert cls.base_model_prefix == "model", cls
        source = inspect.getsource(cls.forward)
        assert "outputs: BaseModelOutputWithPast = self.model(" in source, cls
        after_head = source.split("logits = self.lm_head(hidden_states)\n", 1)[1]
        between = [line.strip() for line in after_head.split("loss = None")[0].splitlines() if line.strip()]
        if softcap is None:
            assert between == [], (cls, between)
        else:
            assert between and all(softcap in ln or ln == "logits = torch.tanh(logits)" for ln in between), between
        assert "loss = self.loss_function(" in after_head, cls


def test_for_trainer_opt_in_matches_its_full_logits_model():
    cfg = CELoRAConfig(**SMALL)
    ref = trained_like(for_trainer(tiny_llama(), cfg, verbose=False, factor_cache=None)[0])
    chunked, _ = for_trainer(tiny_llama(), cfg, verbose=False, factor_cache=None, loss_chunk=CHUNK)
    chunked.load_state_dict(ref.state_dict())
    chunked.train()
    assert is_chunked(chunked) and not is_chunked(ref)
    ids, labels = batch()
    for step in range(2):
        out_ref, g_ref = loss_and_grads(ref, ids, labels)
        out, g = loss_and_grads(chunked, ids, labels)
        assert out.logits is None
        torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-6, atol=0)
        assert_same_grads(g, g_ref)
        step_both(ref, chunked)
