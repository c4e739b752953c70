"""Where one training step goes: a torch.profiler breakdown, PEFT LoRA r=16 vs CE-LoRA (released config).

    python bench/step_profile.py                  # CPU fp32, SmolLM2-135M shapes, T = 512, 2048, 4096
    python bench/step_profile.py --model tiny --tokens 64,128 --steps 1
    python bench/step_profile.py --device cuda --dtype bf16 --kernel auto --json step_profile.json

One step = forward + backward + AdamW step (+ ``on_optimizer_step``) on a batch of 1 x T tokens
of a random-weight model (bench/end_to_end.py's builder, runner and methods; CELoRAConfig()
defaults; ``--kernel`` sets CELORA_KERNEL, default ``torch``). CE-LoRA's exact refresh step 0 runs
first, so every measured step is an approximate one. Per token count both methods take one
warm-up step, are timed without the profiler (interleaved, median of ``--steps``), then profiled
for ``--steps`` steps each; the table gives per-step means by category (``calls``: top-level ops
per step; ``delta`` = CE-LoRA - LoRA; ``share``: of that method's profiled step):

    forward GEMMs   products of the targeted base linears in the forward, (T, n) x (n, m)
    dX GEMMs        G @ W0 of those linears in the backward: dense (T, m) x (m, n), gathered
                    (T, k) x (k, n), or (T, k + r + r0) x (k + r + r0, n) (half precision)
    gathers         index_select / index / gather / cat in the backward (the CE-LoRA path)
    LoRA GEMMs      every product with a rank dimension: r = 16 (PEFT), r = r0 = 14, r + r0
    attention       scaled-dot-product attention forward and backward, softmax, bmm
    LM head         the (T, hidden) x (hidden, vocab) product and its dX
    optimizer       every op under the ``Optimizer.step`` / ``zero_grad`` ranges
    other kernels   every other op: elementwise, norms, RoPE, loss, grad accumulation, copies
    overhead        wall step time minus the sum of the rows above

GEMMs are classified by their shapes (``record_shapes``; the projections' (m, n), k = ceil(keep m),
the head's (V, h) and the ranks come from the model config and CELoRAConfig) and by whether they
run under an ``autograd::engine::evaluate_function`` range (backward). Each top-level op's
category holds for everything it calls (``aten::linear`` -> ``matmul`` -> ``t``, ``mm``, ...).
Times are op *self* times, so nothing counts twice: self CPU time on CPU, the durations of the
kernels each op launched on CUDA (a Triton ``_amm_kernel`` is a dX GEMM wherever it is attached).
"overhead" is what is left of the wall time: on CPU the Python of the model, PEFT and CE-LoRA's
backward, the autograd engine, AdamW's per-parameter loop and the profiler's own per-event cost
(the unprofiled step shows how much that is); on CUDA, the time the GPU sat idle (kernels the
profiler links to no CPU event land there too). torch.profiler has no overhead row of its own
(Python frames only appear with stack tracing, which slows every op), and this remainder makes the
rows add up to the step exactly. The summary compares the layer-only gain (dX GEMMs + gathers + LoRA GEMMs) with the
step's, next to the FLOP ceiling of docs/design.md section 3 (celora_dist.costmodel). ``--json``
writes the rows and summaries too. Random weights suffice: the work does not depend on the values.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, also when loaded by path
from _common import interleaved_medians, machine_line, markdown_table, sync  # noqa: E402
from end_to_end import DTYPES, LORA_R, MODELS, Runner, build_model, make_method  # noqa: E402

from celora_dist import CELoRAConfig  # noqa: E402
from celora_dist.config import num_kept  # noqa: E402
from celora_dist.costmodel import flop_ceiling  # noqa: E402
from celora_dist.layer import celora_layers  # noqa: E402

CATEGORIES = ("forward GEMMs", "dX GEMMs", "gathers", "LoRA GEMMs", "attention", "LM head", "optimizer",
              "other kernels", "overhead")
LAYER = ("dX GEMMs", "gathers", "LoRA GEMMs")  # the rows the CE-LoRA layer changes
STEP = "step (profiled)"
METHODS = ("lora", "celora")
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention",
                 "aten::softmax", "aten::_softmax", "aten::bmm", "aten::baddbmm")
GATHER_OPS = ("aten::index_select", "aten::index", "aten::gather", "aten::cat", "aten::take")
TRITON_DX = "amm_kernel"  # celora_dist/kernels/amm_triton.py's kernel, launched outside any aten op
COLUMNS = ["category", "lora_ms", "celora_ms", "delta_ms", "lora_share", "celora_share", "lora_calls",
           "celora_calls"]
FORMATS = {"lora_ms": "{:.1f}", "celora_ms": "{:.1f}", "delta_ms": "{:+.1f}", "lora_share": "{:.1%}",
           "celora_share": "{:.1%}", "lora_calls": "{:.0f}", "celora_calls": "{:.0f}"}


@dataclass(frozen=True)
class Shapes:
    """The GEMM shapes one step can contain, (rows, inner, cols), from the model and the configs."""

    tokens: int
    forward: frozenset[tuple[int, int]]  # (n, m) of each targeted projection: (T, n) x (n, m)
    dx: frozenset[tuple[int, int]]       # (inner, n) of its dX: inner = m, k or k + r + r0
    head: tuple[int, int]                # (hidden, vocab)
    ranks: frozenset[int]                # LoRA and double-LoRA ranks

    @classmethod
    def of(cls, probe: torch.nn.Module, cfg: CELoRAConfig, tokens: int) -> Shapes:
        forward, dx = set(), set()
        for name, module in probe.named_modules():
            keep = cfg.keep_for(name) if isinstance(module, torch.nn.Linear) else None
            if keep is None:
                continue
            m, n = module.out_features, module.in_features
            forward.add((n, m))
            dx.add((m, n))
            if keep != 1.0:
                k = num_kept(keep, m)
                dx.update({(k, n), (k + cfg.r + cfg.r0, n)})
        vocab, hidden = probe.get_output_embeddings().weight.shape
        ranks = frozenset({LORA_R, cfg.r, cfg.r0, cfg.r + cfg.r0})
        return cls(tokens, frozenset(forward), frozenset(dx), (hidden, vocab), ranks)


def gemm_dims(evt: FunctionEvent) -> tuple[int, int, int] | None:
    """(rows, inner, cols) of a 2-D matrix product op (3-D activations flattened), else None."""
    shapes = evt.input_shapes
    if evt.name == "aten::linear" and len(shapes) >= 2 and len(shapes[1]) == 2:
        x, w = shapes[0], shapes[1]
        return math.prod(x[:-1]), x[-1], w[0]
    operands = {"aten::mm": 0, "aten::matmul": 0, "aten::addmm": 1, "aten::addmm_": 1}.get(evt.name)
    if operands is None or len(shapes) < operands + 2:
        return None
    x, y = shapes[operands], shapes[operands + 1]
    if len(x) < 2 or len(y) != 2:
        return None  # batched: attention's matmul
    return math.prod(x[:-1]), x[-1], y[1]


def classify(evt: FunctionEvent, backward: bool, s: Shapes) -> str | None:
    """The category of a top-level op, or None for a matrix product of no known shape."""
    name = evt.name
    if any(key in name for key in ATTENTION_OPS) or (name == "aten::matmul" and gemm_dims(evt) is None):
        return "attention"
    if backward and name in GATHER_OPS:
        return "gathers"
    dims = gemm_dims(evt)
    if dims is None:
        return "other kernels"
    rows, inner, cols = dims
    if rows == s.tokens:
        if (inner, cols) == (s.head[::-1] if backward else s.head):
            return "LM head"
        if (inner, cols) in (s.dx if backward else s.forward):
            return "dX GEMMs" if backward else "forward GEMMs"
    if s.ranks & {rows, inner, cols}:
        return "LoRA GEMMs"
    return None


def breakdown(events: list[FunctionEvent], s: Shapes, device: str) -> tuple[Counter, Counter, Counter]:
    """(microseconds, calls, unmatched GEMMs) per category over the profiled events.

    Walks each CPU thread's event tree from its roots: the first aten op on a path decides the
    category of its whole subtree; the Optimizer ranges decide theirs. Range events (autograd
    nodes, the CE-LoRA Function) are no op: their self time is overhead.
    """
    times, calls, unmatched = Counter(), Counter(), Counter()

    def visit(evt: FunctionEvent, category: str | None, backward: bool, in_op: bool) -> None:
        backward = backward or evt.name.startswith("autograd::engine::evaluate_function")
        is_op = evt.name.startswith("aten::")
        if category is None and evt.name.startswith("Optimizer."):
            category = "optimizer"
        elif category is None and is_op:
            category = classify(evt, backward, s)
            if category is None:
                unmatched[f"{evt.name}{evt.input_shapes}{' (bwd)' if backward else ''}"] += 1
                category = "other kernels"
        if is_op and not in_op:
            calls[category] += 1
        if device == "cuda":
            for kernel in evt.kernels:
                times["dX GEMMs" if TRITON_DX in kernel.name else category or "other kernels"] += kernel.duration
        elif is_op:
            times[category] += evt.self_cpu_time_total
        for child in evt.cpu_children:
            visit(child, category, backward, in_op or is_op)

    for evt in events:
        if evt.device_type == DeviceType.CPU and evt.cpu_parent is None:
            visit(evt, None, False, False)
    return times, calls, unmatched


def profile_steps(runners: dict[str, Runner], steps: int, s: Shapes, device: str) -> dict[str, dict]:
    """Per method: per-step ms by category (overhead = wall - the rest), op counts, unmatched GEMMs.

    The methods' profiled steps are interleaved (one step of each per round, each in its own
    profiler session): profiling one method's steps after the other's let the machine's drift
    show up as a difference — identical forward GEMMs differed by 10% between the blocks.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    totals = {m: (Counter(), Counter(), set(), [0.0]) for m in runners}
    for _ in range(steps):
        for method, runner in runners.items():
            times, calls, unmatched, wall = totals[method]
            with profile(activities=activities, record_shapes=True) as prof:
                sync(device)
                start = time.perf_counter()
                runner.step()
                sync(device)
                wall[0] += time.perf_counter() - start
            t, c, u = breakdown(prof.events(), s, device)
            times.update(t)
            calls.update(c)
            unmatched.update(u)
    out = {}
    for method, (times, calls, unmatched, wall) in totals.items():
        ms = {c: times[c] / 1e3 / steps for c in CATEGORIES}
        ms["overhead"] = 1e3 * wall[0] / steps - sum(ms.values())
        out[method] = {"ms": ms, "calls": {c: calls[c] / steps for c in CATEGORIES},
                       "step_ms": 1e3 * wall[0] / steps, "unmatched": sorted(unmatched)}
    return out


def token_ids(vocab: int, tokens: int, device: str) -> torch.Tensor:
    """A fixed random batch of 1 x ``tokens`` ids."""
    return torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)


def check_approximate(model: torch.nn.Module) -> None:
    """Fail unless every approximate CE-LoRA layer has its indices and no refresh is due."""
    for name, layer in celora_layers(model):
        if not layer.is_exact and (layer.selected is None or layer.refresh_due()):
            raise RuntimeError(f"{name} is not in an approximate step (selected={layer.selected is not None})")


def table_rows(prof: dict[str, dict]) -> list[dict]:
    lora, celora = prof["lora"], prof["celora"]
    rows = [{"category": c, "lora_ms": lora["ms"][c], "celora_ms": celora["ms"][c],
             "delta_ms": celora["ms"][c] - lora["ms"][c], "lora_share": lora["ms"][c] / lora["step_ms"],
             "celora_share": celora["ms"][c] / celora["step_ms"],
             "lora_calls": lora["calls"][c] if c != "overhead" else math.nan,
             "celora_calls": celora["calls"][c] if c != "overhead" else math.nan} for c in CATEGORIES]
    rows.append({"category": STEP, "lora_ms": lora["step_ms"], "celora_ms": celora["step_ms"],
                 "delta_ms": celora["step_ms"] - lora["step_ms"], "lora_share": 1.0, "celora_share": 1.0,
                 "lora_calls": sum(lora["calls"].values()), "celora_calls": sum(celora["calls"].values())})
    return rows


def report(T: int, plain: dict[str, float], prof: dict[str, dict], ceiling: float) -> dict:
    """Print T's table and summary lines; return them as {"summary", "rows"}."""
    rows = table_rows(prof)
    layer = {m: sum(prof[m]["ms"][c] for c in LAYER) for m in METHODS}
    saved = layer["lora"] - layer["celora"]
    summary = {"tokens": T, "lora_step_ms": 1e3 * plain["lora"], "celora_step_ms": 1e3 * plain["celora"],
               "speedup": plain["lora"] / plain["celora"],
               "speedup_profiled": prof["lora"]["step_ms"] / prof["celora"]["step_ms"],
               "layer_lora_ms": layer["lora"], "layer_celora_ms": layer["celora"],
               "layer_gain": layer["lora"] / layer["celora"],
               "layer_only_speedup": prof["lora"]["step_ms"] / (prof["lora"]["step_ms"] - saved),
               "rest_delta_ms": rows[-1]["delta_ms"] + saved, "ceiling": ceiling,
               "unmatched": {m: prof[m]["unmatched"] for m in METHODS}}
    print(f"\n### T = {T} tokens (batch 1 x {T}); ms per step, delta = CE-LoRA - LoRA\n")
    print(markdown_table(rows, COLUMNS, FORMATS))
    print(f"\nstep without profiler: LoRA {summary['lora_step_ms']:.1f} ms, CE-LoRA "
          f"{summary['celora_step_ms']:.1f} ms -> speed-up {summary['speedup']:.3f}x "
          f"(profiled {summary['speedup_profiled']:.3f}x); FLOP ceiling {ceiling:.3f}x")
    print(f"layer-only (dX GEMMs + gathers + LoRA GEMMs): LoRA {layer['lora']:.1f} ms -> CE-LoRA "
          f"{layer['celora']:.1f} ms = {summary['layer_gain']:.3f}x, {-saved:+.1f} ms "
          f"({-saved / prof['lora']['step_ms']:+.1%} of LoRA's step: a {summary['layer_only_speedup']:.3f}x "
          f"step if nothing else changed); all other rows together {summary['rest_delta_ms']:+.1f} ms")
    for m in METHODS:
        if prof[m]["unmatched"]:
            print(f"{m}: GEMMs of no known shape (counted as other kernels): {', '.join(prof[m]['unmatched'])}")
    return {"summary": summary, "rows": rows}


def combine(paths: list[Path]) -> list[dict]:
    """Tables from --json files of separate runs (e.g. ``--methods lora`` and ``--methods celora``
    in two processes, when two models' activations do not fit in memory at once)."""
    merged: dict[int, dict] = {}
    ceiling = math.nan
    for path in paths:
        data = json.loads(path.read_text())
        print(f"from {path}: {data['machine']}")
        ceiling = data.get("ceiling", ceiling)
        for T, entry in data["measured"].items():
            slot = merged.setdefault(int(T), {"plain": {}, "prof": {}})
            slot["plain"].update(entry["plain"])
            slot["prof"].update(entry["prof"])
    results = []
    for T, slot in sorted(merged.items()):
        missing = [m for m in METHODS if m not in slot["prof"]]
        if missing:
            raise SystemExit(f"error: T={T} lacks {missing} in {', '.join(map(str, paths))}")
        results.append(report(T, slot["plain"], slot["prof"], ceiling))
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--model", default="smollm2-135m", choices=list(MODELS))
    p.add_argument("--tokens", default="512,2048,4096", help="tokens per micro-batch (batch 1 x T), comma-separated")
    p.add_argument("--steps", type=int, default=2, help="profiled (and unprofiled) steps per method and T")
    p.add_argument("--kernel", default="torch", choices=["torch", "auto", "triton"],
                   help="CELORA_KERNEL: torch = the approximate torch path; auto = Triton on CUDA")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="profile only these (with --json; --combine joins the files into the table)")
    p.add_argument("--combine", type=Path, nargs="+", default=None, help="print the tables of these --json files")
    p.add_argument("--json", type=Path, default=None, help="also write the rows and summaries here")
    a = p.parse_args(argv)
    if a.combine:
        return combine(a.combine)
    methods = [m for m in a.methods.split(",") if m]
    if not methods or set(methods) - set(METHODS):
        p.error(f"--methods must name some of {METHODS}, got {a.methods!r}")
    os.environ["CELORA_KERNEL"] = a.kernel  # read by celora_dist's dispatch on every backward
    token_counts = [int(t) for t in a.tokens.split(",")]
    dtype, cfg = DTYPES[a.dtype], CELoRAConfig()
    if 1 + len(token_counts) * (1 + 2 * a.steps) >= cfg.refresh_every:
        p.error(f"--steps {a.steps} x {len(token_counts)} token counts would reach CE-LoRA's next exact "
                f"refresh step ({cfg.refresh_every}) inside the measurement")
    print(f"step profile, model={a.model} batch=1 tokens={a.tokens} steps={a.steps} kernel={a.kernel} "
          f"methods={','.join(methods)}; {machine_line(a.device, a.dtype)}", flush=True)

    base = build_model(a.model, dtype, a.device)
    with torch.device("meta"):
        probe = build_model(a.model, dtype, "meta")
    ceiling = flop_ceiling(probe, cfg, include_head=True).ratio
    vocab = probe.config.vocab_size
    runners = {m: Runner(make_method(base, None if m == "lora" else cfg), token_ids(vocab, token_counts[0], a.device),
                         a.device, False) for m in methods}
    del base
    for runner in runners.values():
        runner.step()  # for CE-LoRA the exact refresh step 0: indices chosen from here on

    results, measured = [], {}
    for T in token_counts:
        for runner in runners.values():
            runner.ids = token_ids(vocab, T, a.device)
        plain = interleaved_medians({m: r.step for m, r in runners.items()}, a.steps, a.device, warmup=1)
        if "celora" in runners:
            check_approximate(runners["celora"].model)
        prof = profile_steps(runners, a.steps, Shapes.of(probe, cfg, T), a.device)
        if "celora" in runners:
            check_approximate(runners["celora"].model)
        measured[T] = {"plain": plain, "prof": prof}
        if len(runners) == len(METHODS):
            results.append(report(T, plain, prof, ceiling))
        else:
            print(f"T={T}: {', '.join(f'{m} {1e3 * plain[m]:.1f} ms' for m in methods)} (table: --combine)", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"machine": machine_line(a.device, a.dtype), "args": vars(a), "ceiling": ceiling,
                                      "measured": measured, "results": results}, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
