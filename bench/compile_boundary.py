"""What the torch.compile graph boundary of docs/design.md §4 costs: graphs, breaks, compile time, step.

    python bench/compile_boundary.py                         # SmolLM2-135M shapes, 512 tokens, inductor
    python bench/compile_boundary.py --smoke                 # tiny model, Dynamo alone: for the test suite

Same random-weight model, batch and optimizer for every row; per method one eager and one
compiled copy. ``peft-lora+boundary`` is PEFT LoRA with every LoRA layer's forward behind the
same ``torch.compiler.disable`` boundary CE-LoRA layers carry: the difference to ``peft-lora``
compiled is what the boundary itself costs (the breaks and the fusion lost across them), i.e.
the most a traceable CE-LoRA layer (a ``torch.library`` custom op for its backward) could win.
Graphs and breaks come from ``torch._dynamo.explain``; compile_s is the first compiled step
minus a median step; steps are interleaved after the warm-up (medians, IQR).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, also when loaded by path
from _common import iqr, machine_line, markdown_table  # noqa: E402  (puts the checkout on sys.path too)
from end_to_end import MODELS, Runner, build_model, make_method  # noqa: E402

from celora_dist import CELoRAConfig  # noqa: E402

COLUMNS = ["method", "mode", "graphs", "breaks", "compile_s", "step_ms", "step_iqr_ms", "vs_eager"]
FORMATS = {"compile_s": "{:.1f}", "step_ms": "{:.0f}", "step_iqr_ms": "{:.0f}", "vs_eager": "{:.3f}x"}


def with_boundary(model: torch.nn.Module) -> torch.nn.Module:
    """PEFT's LoRA layers made eager under compile exactly as CE-LoRA's are: a subclass whose
    forward carries the boundary (a per-instance attribute would be guarded on per layer)."""
    from peft.tuners.lora import Linear as LoraLinear

    class BoundaryLoraLinear(LoraLinear):
        forward = torch.compiler.disable(LoraLinear.forward)

    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = BoundaryLoraLinear
    return model


def explain(model, ids) -> tuple[int, int]:
    torch._dynamo.reset()
    out = torch._dynamo.explain(copy.deepcopy(model))(input_ids=ids, labels=ids)
    return out.graph_count, out.graph_break_count


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", choices=list(MODELS))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=6, help="timed steps per copy after the warm-up")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, backend eager (Dynamo alone), 2 steps: for the test suite")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.seq_len, a.steps, a.backend = "tiny", 32, 2, "eager"
    base = build_model(a.model, torch.float32, "cpu")
    ids = torch.randint(0, base.config.vocab_size, (1, a.seq_len), generator=torch.Generator().manual_seed(0))
    print(f"compile boundary, model={a.model} seq={a.seq_len} backend={a.backend}; "
          f"{machine_line('cpu', 'fp32')}", flush=True)
    methods = {"peft-lora": lambda: make_method(base, None),
               "peft-lora+boundary": lambda: with_boundary(make_method(base, None)),
               "celora-released": lambda: make_method(base, CELoRAConfig())}
    models = {name: build() for name, build in methods.items()}
    counts = {name: explain(model, ids) for name, model in models.items()}  # each resets Dynamo: all first
    torch._dynamo.reset()
    runners, compile_s = {}, {}
    for name, model in models.items():
        for mode in ("eager", "compiled"):
            copy_ = copy.deepcopy(model)
            runner = Runner(copy_, ids, "cpu", checkpointing=False)
            if mode == "compiled":
                runner.model = torch.compile(copy_, backend=a.backend)
            t = time.perf_counter()
            runner.step()  # warm-up: the compile; for CE-LoRA the exact refresh step 0
            compile_s[(name, mode)] = time.perf_counter() - t
            runner.step()  # CE-LoRA: the first approximate step (the backend measurement)
            runners[(name, mode)] = runner
            print(f"{name} {mode}: first step {compile_s[(name, mode)]:.1f} s", flush=True)
    times = {key: [] for key in runners}
    for _ in range(a.steps):  # interleaved
        for key, runner in runners.items():
            t = time.perf_counter()
            runner.step()
            times[key].append(time.perf_counter() - t)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    rows = []
    for (name, mode), ts in times.items():
        eager = median(times[(name, "eager")])
        graphs, breaks = counts[name] if mode == "compiled" else (float("nan"), float("nan"))
        rows.append({"method": name, "mode": mode, "graphs": graphs, "breaks": breaks,
                     "compile_s": compile_s[(name, mode)] - median(ts) if mode == "compiled" else float("nan"),
                     "step_ms": 1e3 * median(ts), "step_iqr_ms": 1e3 * iqr(ts), "vs_eager": eager / median(ts)})
    print(markdown_table(rows, COLUMNS, FORMATS))
    print("vs_eager = eager step / this step (> 1: compiled is faster); graphs/breaks: torch._dynamo.explain "
          "of one training forward")
    return rows


if __name__ == "__main__":
    main()
