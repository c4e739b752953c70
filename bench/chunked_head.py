"""Chunked LM-head loss vs Hugging Face's full-logits path: peak memory and step time.

    python bench/chunked_head.py                          # SmolLM2-135M (embedded), T = 512, 2048, 4096
    python bench/chunked_head.py --tokens 2048 --repeats 5 --json bench/results/x.json
    python bench/chunked_head.py --smoke --threads 1      # tiny random model: for the test suite

Per token count T (one sequence of T tokens, every label counted: the chunked path's worst case,
an SFT batch whose prompts are ignored skips those rows entirely) and per method -- ``lora`` (the
trainer's --method lora: every layer exact), ``celora`` (the released config) and ``celora+head``
(plus the vocab-sparse head at keep 0.1, the case whose chunked backward recomputes the logits
once more) -- the same model runs with the full logits (``full``) and with
``enable_chunked_loss`` (``chunked``, --chunk tokens per chunk). Both take a warm-up step (CE-LoRA's
exact refresh step 0), then their steps (forward + backward + AdamW + ``on_optimizer_step``) are
interleaved ``--repeats`` times: median and interquartile range. Peak memory: one more
forward + backward of each under ``torch.profiler(profile_memory=True)``; ``peak_mb`` is the
highest "Total Allocated" the CPU allocator reported during it, i.e. what the step allocated on
top of the weights and optimizer state already there. ``loss_diff``: |loss_full - loss_chunked|
of the profiled step (same weights, same batch). ``--kernel`` sets CELORA_KERNEL, default ``torch``:
under ``auto`` each model copy picks its layers' dX backend (exact or approximate) from its own
timings on a noisy machine, so the two paths would run different math (first run, 2026-12-03:
CE-LoRA losses 5e-3 apart after four steps, LoRA's 1e-6).

``--sweep-chunks 256,512,...`` times the head's loss alone (hidden states of the model's width, its
head weight, forward + backward of ``ForCausalLMLoss`` on the full logits vs ``chunked_lm_head_loss``
at each chunk) with the same peak measure: the measurement behind the default chunk.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, also when loaded by path
from _common import iqr, machine_line, markdown_table  # noqa: E402

from celora_dist import CELoRAConfig, inject_celora, on_optimizer_step  # noqa: E402
from celora_dist.chunked_forward import DEFAULT_CHUNK, enable_chunked_loss  # noqa: E402

ALL_EXACT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = {"lora": CELoRAConfig(keep={}, exact=ALL_EXACT), "celora": CELoRAConfig(),
           "celora+head": CELoRAConfig(head_keep=0.1)}
PATHS = ("full", "chunked")
COLUMNS = ["T", "method", "full_ms", "full_iqr_ms", "chunked_ms", "chunked_iqr_ms", "time_ratio", "full_peak_mb",
           "chunked_peak_mb", "peak_saved_mb", "loss_diff"]
FORMATS = {"full_ms": "{:.0f}", "full_iqr_ms": "{:.0f}", "chunked_ms": "{:.0f}", "chunked_iqr_ms": "{:.0f}",
           "time_ratio": "{:.3f}", "full_peak_mb": "{:.0f}", "chunked_peak_mb": "{:.0f}", "peak_saved_mb": "{:.0f}",
           "loss_diff": "{:.1e}"}


def load_model(name: str) -> torch.nn.Module:
    """SmolLM2-135M-Instruct (the trainer's embedded default, real weights, fp32) or a tiny random Llama."""
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    from transformers import AutoModelForCausalLM

    from celora_dist.train.embedded import ensure_model

    model = AutoModelForCausalLM.from_pretrained(ensure_model(), dtype=torch.float32)
    model.config.use_cache = False
    return model


def peak_mb(fn) -> float:
    """The highest "Total Allocated" (MB) the CPU allocator reported to the profiler while ``fn`` ran."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    finally:
        os.unlink(path)
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0) / 2**20


class Runner:
    """One (method, path) model with its optimizer; ``step`` = forward, backward, AdamW, schedule."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor):
        self.model, self.ids = model.train(), ids
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(self) -> float:
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        on_optimizer_step(self.model)
        return float(loss.detach())

    def peak_mb(self) -> tuple[float, float]:
        """(peak MB allocated during one forward + backward, its loss); gradients dropped after."""
        losses = []

        def forward_backward():
            losses.append(self.model(input_ids=self.ids, labels=self.ids).loss)
            losses[-1].backward()

        peak = peak_mb(forward_backward)
        self.opt.zero_grad(set_to_none=True)
        return peak, float(losses[-1].detach())


def measure(base: torch.nn.Module, tokens: int, method: str, chunk: int, repeats: int) -> dict:
    ids = torch.randint(0, base.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    model = inject_celora(copy.deepcopy(base), METHODS[method], verbose=False, factor_cache=None)
    runners = {"full": Runner(model, ids), "chunked": Runner(enable_chunked_loss(copy.deepcopy(model), chunk), ids)}
    for runner in runners.values():
        runner.step()  # warm-up: CE-LoRA's exact refresh step 0, the head's measuring step
    times = {path: [] for path in PATHS}
    for _ in range(repeats):
        for path, runner in runners.items():
            start = time.perf_counter()
            runner.step()
            times[path].append(time.perf_counter() - start)
    (full_mb, full_loss), (chunked_mb, chunked_loss) = runners["full"].peak_mb(), runners["chunked"].peak_mb()
    med = {path: sorted(ts)[len(ts) // 2] for path, ts in times.items()}
    return {"T": tokens, "method": method, "chunk": chunk, "repeats": repeats,
            "full_ms": 1e3 * med["full"], "full_iqr_ms": 1e3 * iqr(times["full"]),
            "chunked_ms": 1e3 * med["chunked"], "chunked_iqr_ms": 1e3 * iqr(times["chunked"]),
            "time_ratio": med["chunked"] / med["full"], "full_peak_mb": full_mb, "chunked_peak_mb": chunked_mb,
            "peak_saved_mb": full_mb - chunked_mb, "loss_diff": abs(full_loss - chunked_loss),
            "full_step_s": times["full"], "chunked_step_s": times["chunked"]}


SWEEP_COLUMNS = ["T", "chunk", "head_ms", "head_iqr_ms", "vs_full", "peak_mb"]
SWEEP_FORMATS = {"head_ms": "{:.0f}", "head_iqr_ms": "{:.0f}", "vs_full": "{:.3f}", "peak_mb": "{:.0f}"}


def sweep(base: torch.nn.Module, tokens: int, chunks: list[int], repeats: int) -> list[dict]:
    """The head's loss alone, full logits vs each chunk: forward + backward to the hidden states."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from celora_dist.chunked_loss import chunked_lm_head_loss

    head = base.get_output_embeddings()
    head.weight.requires_grad_(False)  # frozen, as under LoRA
    g = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(1, tokens, head.in_features, generator=g).requires_grad_(True)
    labels = torch.randint(0, head.out_features, (1, tokens), generator=g)

    def full():
        ForCausalLMLoss(head(hidden), labels, head.out_features).backward()

    cases = {"full": full}
    for chunk in chunks:
        cases[chunk] = lambda chunk=chunk: chunked_lm_head_loss(hidden, head, labels, chunk=chunk).backward()
    times = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            hidden.grad = None
    full_med = sorted(times["full"])[len(times["full"]) // 2]
    rows = []
    for name, fn in cases.items():
        med = sorted(times[name])[len(times[name]) // 2]
        rows.append({"T": tokens, "chunk": name, "head_ms": 1e3 * med, "head_iqr_ms": 1e3 * iqr(times[name]),
                     "vs_full": med / full_med, "peak_mb": peak_mb(fn), "head_step_s": times[name]})
        hidden.grad = None
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "tiny"])
    p.add_argument("--tokens", default="512,2048,4096", help="comma-separated sequence lengths T")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="tokens per chunk of the chunked path")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sweep-chunks", default=None,
                   help="comma-separated chunk sizes: time the head's loss alone at each (instead of the steps)")
    p.add_argument("--kernel", default="torch", choices=["torch", "auto", "triton"],
                   help="CELORA_KERNEL for the run (torch: the approximate backend everywhere, no timing-based choice)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    p.add_argument("--json", default=None, help="write the rows, the machine and the load average here")
    p.add_argument("--smoke", action="store_true", help="tiny model, T = 48, chunk 16, 1 repeat: for the tests")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.tokens, a.chunk, a.repeats = "tiny", "48", 16, 1
    os.environ["CELORA_KERNEL"] = a.kernel
    if a.threads:
        torch.set_num_threads(a.threads)
    methods = a.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    machine = machine_line("cpu", "fp32")
    load_before = os.getloadavg()
    print(f"chunked LM-head loss, model={a.model} chunk={a.chunk} repeats={a.repeats} kernel={a.kernel}; {machine}; "
          f"load average {load_before[0]:.2f}", flush=True)
    base = load_model(a.model)
    rows = []
    if a.sweep_chunks:
        for tokens in (int(t) for t in a.tokens.split(",")):
            rows += sweep(base, tokens, [int(c) for c in a.sweep_chunks.split(",")], a.repeats)
            print(f"# T={tokens} swept", flush=True)
        print(markdown_table(rows, SWEEP_COLUMNS, SWEEP_FORMATS))
        print("head_ms: forward + backward of the head's loss to the hidden states; vs_full = head_ms / the full "
              "path's; peak_mb as for the steps.")
    for tokens in (int(t) for t in a.tokens.split(",")) if not a.sweep_chunks else ():
        for method in methods:
            rows.append(measure(base, tokens, method, a.chunk, a.repeats))
            r = rows[-1]
            print(f"# T={tokens} {method}: full {r['full_ms']:.0f} ms / {r['full_peak_mb']:.0f} MB, chunked "
                  f"{r['chunked_ms']:.0f} ms / {r['chunked_peak_mb']:.0f} MB", flush=True)
    if not a.sweep_chunks:
        print(markdown_table(rows, COLUMNS, FORMATS))
        print("time_ratio = chunked_ms / full_ms (step: forward + backward + AdamW); *_iqr_ms: interquartile range "
              "over the rounds; peak_mb: the most the step's forward + backward held allocated beyond what existed "
              "before it.")
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine, "model": a.model, "chunk": a.chunk, "kernel": a.kernel,
                                            "date": time.strftime("%Y-%m-%d"), "load_before": load_before,
                                            "load_after": load_after, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
