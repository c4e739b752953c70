"""Injection into HF causal LMs, training, and PEFT-format adapter round trips."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from celora_dist import (CELoRAConfig, CELoRALinear, inject_celora, load_adapter, merge_celora,
                         on_optimizer_step, save_adapter)

from .conftest import tiny_llama

SMALL = dict(r=4, r0=4, alpha=8, refresh_every=2)


def tiny_model(family: str):
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    configs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {}),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 16}),
    }
    cfg_cls, model_cls, extra = configs[family]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**common, **extra))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_inject_converts_all_projections_and_freezes_the_rest(family, capsys):
    model = tiny_model(family)
    inject_celora(model, CELoRAConfig(**SMALL))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CELoRALinear)}
    assert len(layers) == 2 * 7
    exact = {n.rsplit(".", 1)[-1] for n, m in layers.items() if m.is_exact}
    assert exact == {"q_proj", "k_proj", "gate_proj"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(layers)
    assert model.celora_summary["approx_layers"] == 8 and model.celora_summary["exact_layers"] == 6
    assert "8 approximate" in capsys.readouterr().out


def test_unknown_target_lists_model_linear_names():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"\['nonexistent_proj'\].*'down_proj'.*'q_proj'"):
        inject_celora(model, CELoRAConfig(**SMALL, keep={"nonexistent_proj": 0.5}, exact=("q_proj",)))


def test_r0_too_large_names_the_field_and_layer():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"r0=64 .*v_proj"):
        inject_celora(model, CELoRAConfig(r=4, r0=64))


@pytest.mark.parametrize("kwargs,field", [
    (dict(keep={"v_proj": 0.0}), r"keep\['v_proj'\]"),
    (dict(keep={"v_proj": 1.5}), r"keep\['v_proj'\]"),
    (dict(keep={"v_proj": float("nan")}), r"keep\['v_proj'\]"),
    (dict(r=-1), r"\.r must"),
    (dict(r0=-2), r"\.r0 must"),
    (dict(score="random"), r"\.score must"),
    (dict(refresh_every=0), r"refresh_every"),
    (dict(dropout=1.0), r"dropout"),
    (dict(alpha=0), r"alpha"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CELoRAConfig(**kwargs)


def test_config_round_trip_and_unknown_field():
    cfg = CELoRAConfig(r=8, keep={"v_proj": 0.3}, exact=("q_proj",))
    assert CELoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="refesh_every"):
        CELoRAConfig.from_dict({"refesh_every": 3})


def fixed_batch(vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (4, 16), generator=g)


def train_steps(model, steps=12, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = fixed_batch()
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        on_optimizer_step(model)
        losses.append(loss.item())
    return losses


def test_training_lowers_loss_on_fixed_batch():
    model = inject_celora(tiny_llama(), CELoRAConfig(**SMALL), verbose=False)
    losses = train_steps(model)
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(m.selected is not None for m in model.modules()
               if isinstance(m, CELoRALinear) and not m.is_exact)


def test_peft_round_trip_gives_same_logits(tmp_path):
    model = inject_celora(tiny_llama(), CELoRAConfig(**SMALL), verbose=False)
    train_steps(model, steps=4)
    model.eval()
    ids = fixed_batch(seed=1)
    with torch.no_grad():
        live = model(input_ids=ids).logits
    out = save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    peft_model = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    with torch.no_grad():
        reloaded = peft_model(input_ids=ids).logits
    torch.testing.assert_close(reloaded, live, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(live, tiny_llama()(input_ids=ids).logits.detach(), atol=1e-4)

    # our own loader and the merge give the same model too
    fresh = inject_celora(tiny_llama(), CELoRAConfig(**SMALL), verbose=False)
    load_adapter(fresh, out)
    merged = merge_celora(fresh).eval()
    assert not any(isinstance(m, CELoRALinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, live, rtol=1e-5, atol=1e-5)


def test_save_replaces_existing_adapter_atomically(tmp_path):
    model = inject_celora(tiny_llama(), CELoRAConfig(**SMALL), verbose=False)
    target = tmp_path / "adapter"
    save_adapter(model, target)
    train_steps(model, steps=2)
    save_adapter(model, target)  # overwrite
    fresh = inject_celora(tiny_llama(), CELoRAConfig(**SMALL), verbose=False)
    load_adapter(fresh, target)
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_load_adapter_errors_name_the_problem(tmp_path):
    model = inject_celora(tiny_llama(), CELoRAConfig(**SMALL), verbose=False)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(model, tmp_path / "missing")
    other = inject_celora(tiny_llama(), CELoRAConfig(**SMALL, keep={"v_proj": 0.5}, exact=()), verbose=False)
    save_adapter(other, tmp_path / "v_only")
    with pytest.raises(ValueError, match="missing"):
        load_adapter(model, tmp_path / "v_only")


def lora_grads(model, ids):
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_hf_gradient_checkpointing_gives_same_lora_gradients():
    ids = fixed_batch()
    plain = inject_celora(tiny_llama(), CELoRAConfig(**SMALL), verbose=False)
    train_steps(plain, steps=3)  # past the first refresh: step 3 is approximate
    ckpt = inject_celora(tiny_llama(), CELoRAConfig(**SMALL), verbose=False)
    ckpt.load_state_dict(plain.state_dict())
    from celora_dist import celora_state_dict, load_celora_state_dict

    load_celora_state_dict(ckpt, celora_state_dict(plain))
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()
    assert plain.model.layers[0].mlp.down_proj.step == 3
    ref, got = lora_grads(plain, ids), lora_grads(ckpt, ids)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
