"""Training-step time: PEFT LoRA vs CE-LoRA (released config) vs CE-LoRA adaptive keep.

    python bench/end_to_end.py                                   # CPU, SmolLM2-135M shapes
    python bench/end_to_end.py --device cuda --dtype bf16 --model llama-3.2-1b --seq-len 2048
    python bench/end_to_end.py --gradient-checkpointing --head-keep 0.1

Same random-weight model shape, same batch, same optimizer, one run: the methods'
steps are interleaved (warm-up and the first, exact refresh step excluded) and the
median forward, backward and whole-step times are reported with tokens/s, the
speed-up over PEFT LoRA r=16 and the FLOP ceiling of docs/design.md §3 for that config
and model (celora_dist.costmodel), plus activation memory: bytes saved for backward
(CPU) or peak allocated (CUDA). Random weights suffice for timing: the work done
does not depend on the values, only on k, which adaptive keep picks from G.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from _common import interleaved_medians, iqr, machine_line, markdown_table, sync
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from celora_dist import CELoRAConfig, inject_celora, on_optimizer_step
from celora_dist.costmodel import flop_ceiling

MODELS = {  # LLaMA-family shapes (hidden, intermediate, layers, heads, kv heads, vocab)
    "tiny": (64, 160, 2, 4, 2, 256),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COLUMNS = ["method", "fwd_ms", "bwd_ms", "step_ms", "step_iqr_ms", "tokens_per_s", "speedup", "ceiling",
           "of_ceiling", "gain_share", "act_mem_mb"]
FORMATS = {"fwd_ms": "{:.0f}", "bwd_ms": "{:.0f}", "step_ms": "{:.0f}", "step_iqr_ms": "{:.0f}",
           "tokens_per_s": "{:.0f}",
           "speedup": "{:.3f}x", "ceiling": "{:.3f}x", "of_ceiling": "{:.0%}", "gain_share": "{:.0%}", "act_mem_mb": "{:.1f}"}


def build_model(name: str, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    hidden, inter, layers, heads, kv, vocab = MODELS[name]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                      tie_word_embeddings=True, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: LLaMA-3.2-1B draws 1.2e9 weights
        model = LlamaForCausalLM(cfg)
    return model.to(dtype=dtype)


LORA_R = 16  # the PEFT baseline's rank (CE-LoRA's released r = 14 + r0 = 14 keeps its parameter budget)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_method(base: LlamaForCausalLM, cfg: CELoRAConfig | None) -> torch.nn.Module:
    """A deep copy of ``base`` as PEFT LoRA r=16, rsLoRA alpha 32 (``cfg`` None) or CE-LoRA with ``cfg``."""
    model = copy.deepcopy(base)
    if cfg is None:
        lora = LoraConfig(r=LORA_R, lora_alpha=32, use_rslora=True, task_type="CAUSAL_LM",
                          target_modules=LORA_TARGETS)
        return get_peft_model(model, lora)
    inject_celora(model, cfg, verbose=False)
    return model


class Runner:
    """One method's model + optimizer; step() = forward, backward, optimizer step."""

    def __init__(self, model, ids, device: str, checkpointing: bool):
        self.model, self.ids, self.device = model, ids, device
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        self.loss = None

    def forward(self):
        self.loss = self.model(input_ids=self.ids, labels=self.ids).loss

    def backward(self):
        self.loss.backward()

    def finish(self):
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        on_optimizer_step(self.model)

    def step(self):
        self.forward()
        self.backward()
        self.finish()

    def activation_mb(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self.forward()
            peak = torch.cuda.max_memory_allocated() - base
            self.backward()
            self.opt.zero_grad(set_to_none=True)
            return peak / 2**20
        seen: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            return t

        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.forward()
        self.backward()
        self.opt.zero_grad(set_to_none=True)
        return sum(b for ptr, b in seen.items() if ptr not in params) / 2**20


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--model", default="smollm2-135m", choices=list(MODELS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--error-budget", type=float, default=0.3, help="adaptive keep's budget")
    p.add_argument("--head-keep", type=float, default=None, help="also run CE-LoRA + vocab-sparse head")
    p.add_argument("--smoke", action="store_true", help="tiny model, 1 repeat: for the test suite")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.seq_len, a.repeats = "tiny", 32, 1
    dtype = DTYPES[a.dtype]
    base = build_model(a.model, dtype, a.device)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (a.batch, a.seq_len), generator=torch.Generator().manual_seed(0)).to(a.device)
    print(f"end-to-end step, model={a.model} batch={a.batch} seq={a.seq_len} "
          f"checkpointing={a.gradient_checkpointing}; {machine_line(a.device, a.dtype)}", flush=True)

    released = CELoRAConfig()
    methods = {"peft-lora-r16": None, "celora-released": released,
               "celora-auto": CELoRAConfig(keep="auto", error_budget=a.error_budget)}
    if a.head_keep is not None:
        methods["celora-released+head"] = CELoRAConfig(head_keep=a.head_keep)
    # Progress lines ("# ...") are printed as each thing finishes, so a run cut off by a time
    # limit still says how far it got and what each finished round measured.
    runners = {}
    for name, cfg in methods.items():
        t0 = time.perf_counter()
        runners[name] = Runner(make_method(base, cfg), ids, a.device, a.gradient_checkpointing)
        t1 = time.perf_counter()
        runners[name].step()  # warm-up; for CE-LoRA this is the exact refresh step 0
        sync(a.device)
        print(f"# {name}: built in {t1 - t0:.1f} s, warm-up step {time.perf_counter() - t1:.1f} s", flush=True)
    del base

    steps, fwds, bwds = ({n: [] for n in runners} for _ in range(3))
    for r in range(a.repeats):  # interleaved rounds; forward and backward timed separately
        for name, runner in runners.items():
            t = interleaved_medians({"f": runner.forward}, 1, a.device, warmup=0)["f"]
            b = interleaved_medians({"b": runner.backward}, 1, a.device, warmup=0)["b"]
            runner.finish()
            fwds[name].append(t)
            bwds[name].append(b)
            steps[name].append(t + b)
        print(f"# round {r + 1}/{a.repeats} step_ms: "
              + " ".join(f"{n}={1e3 * steps[n][-1]:.1f}" for n in runners), flush=True)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    tokens = a.batch * a.seq_len
    lora_step = median(steps["peft-lora-r16"])
    rows = []
    with torch.device("meta"):
        probe = build_model(a.model, dtype, "meta")
    for name, runner in runners.items():
        cfg = methods[name]
        ceiling = 1.0 if cfg is None else flop_ceiling(
            probe, cfg, a.gradient_checkpointing, include_head=True, auto_keep=_mean_keep(runner.model)).ratio
        step = median(steps[name])
        speedup = lora_step / step
        rows.append({"method": name, "fwd_ms": 1e3 * median(fwds[name]), "bwd_ms": 1e3 * median(bwds[name]),
                     "step_ms": 1e3 * step, "step_iqr_ms": 1e3 * iqr(steps[name]),
                     "tokens_per_s": tokens / step, "speedup": speedup,
                     "ceiling": ceiling, "of_ceiling": speedup / ceiling,
                     "gain_share": (speedup - 1) / (ceiling - 1) if ceiling > 1 else float("nan"),
                     "act_mem_mb": runner.activation_mb()})
    print(markdown_table(rows, COLUMNS, FORMATS))
    print("of_ceiling = speedup / ceiling; gain_share = (speedup - 1) / (ceiling - 1), the share of the "
          "possible gain realised. Step = forward + backward (the optimizer update is the same for all); "
          "step_iqr_ms = interquartile range of the step over the rounds (a speed-up within it is noise).")
    return rows


def _mean_keep(model) -> float:
    """Average chosen keep of adaptive layers (for their FLOP ceiling), 0.6 if none yet."""
    from celora_dist.layer import celora_layers

    keeps = [layer.k / layer.out_features for _, layer in celora_layers(model) if layer.adaptive]
    return sum(keeps) / len(keeps) if keeps else 0.6


if __name__ == "__main__":
    main()
