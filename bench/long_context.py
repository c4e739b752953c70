"""The long-context table: how long a sequence trains at micro-batch 1, and at what speed.

    python bench/long_context.py                       # SmolLM2-135M, T = 1024/2048/4096, every config (~40 min, 2 cores)
    python bench/long_context.py --tokens 2048 --configs lora-chunked,celora-chunked
    python bench/long_context.py --verify              # also train once at each config's projected longest T
    python bench/long_context.py --verify lora-chunked=9984,celora-chunked   # at a given T / at the fit's
    python bench/long_context.py --smoke               # the tiny test model, 2 short lengths (the test)

Every run is ``launch/train.py`` itself (its own process; SP through DeepSpeed's launcher) on one
document of T tokens per step, every token a label (alpaca rows: a one-line instruction, the
document as the output), micro-batch 1, fp32, ``--max-steps`` steps; no evaluation. A config is
the trainer's flags: ``lora`` (``--method lora``) or ``celora`` (the released config), ``full``
(``--loss-chunk 0``: HF's (T, V) logits) or ``chunked`` (the default ``--loss-chunk 1024``),
``+ckpt`` (``--gradient-checkpointing``), ``+sp3`` (``--sequence-parallel 3`` on 3 ranks, 1 thread each:
SmolLM2-135M's 9 heads refuse SP 2; T is rounded down to a multiple of 3).

Measured per run, from the trainer's metrics.jsonl: ``peak_mb`` (rank 0's peak resident memory,
the whole process: weights, optimizer, activations), the step time and tokens/s of the steady steps
(median and range): not the first (start-up work, first-touch pages) and none on which CE-LoRA
refreshed, measured or timed its dX backends (those carry telemetry records). Per config, a least-squares line ``peak = base + per_token · T`` through the
measured lengths gives ``longest_T``: the T at which the machine's memory (``--memory-gb``,
default MemTotal less 1 GB for the system; SP: all its ranks on this machine) would be full; it is a
projection unless ``--verify`` trained there. The step time is fitted as ``a·T + b·T²`` (the
attention term) to project tokens/s at that length.

The same table for a model that needs GPUs comes from ``celora_dist.memory_model`` (no run):
``--predict llama-3-8b`` prints its projection on ``--gpus`` GPUs of ``--gpu-gb`` each.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, also when loaded by path
from _common import markdown_table  # noqa: E402
from _trainer_runs import run_trainer  # noqa: E402

CONFIGS: dict[str, list[str]] = {}
for _method in ("lora", "celora"):
    _base = ["--method", _method] + (["--r", "16"] if _method == "lora" else [])
    CONFIGS[f"{_method}-full"] = _base + ["--loss-chunk", "0"]
    CONFIGS[f"{_method}-chunked"] = _base
    CONFIGS[f"{_method}-full+ckpt"] = _base + ["--loss-chunk", "0", "--gradient-checkpointing"]
    CONFIGS[f"{_method}-chunked+ckpt"] = _base + ["--gradient-checkpointing"]
    # SP 3, not 2: SmolLM2-135M's 9 query / 3 KV heads do not split over 2 ranks (Ulysses hands each rank
    # heads / SP whole heads; the trainer refuses SP 2 for it with one error line)
    CONFIGS[f"{_method}-chunked+ckpt+sp3"] = _base + ["--gradient-checkpointing", "--sequence-parallel", "3"]

PREDICT_COLUMNS = ["model", "config", "gpus", "sp", "longest_T", "tokens_per_s", "per_token_kb"]
SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def method_config(config: str):
    """The CELoRAConfig a config's --method means: LoRA r 16 on the seven projections, or the released one."""
    from celora_dist import CELoRAConfig

    return CELoRAConfig(keep={}, exact=SEVEN, r=16) if config.startswith("lora") else CELoRAConfig()


def model_kwargs(config: str, **kwargs) -> dict:
    """celora_dist.memory_model.step_memory's keywords for a config name."""
    return dict(checkpointing="+ckpt" in config, loss_chunk=1024 if "chunked" in config else None, **kwargs)


def predict(model: str, gpus: int, gpu_gb: float, peak_tflops: float, mfu: float) -> list[dict]:
    """The memory model's longest T per config for ``model`` on ``gpus`` GPUs (DeepSpeed bf16
    weights and activations, ZeRO-3 over all GPUs; SP = all GPUs for the +sp rows, else 1 and each
    GPU trains its own sequence), and the step FLOPs' tokens/s at an assumed ``mfu``."""
    from celora_dist.costmodel import MODEL_SHAPES, step_flops
    from celora_dist.memory_model import longest_sequence

    shape = MODEL_SHAPES[model]
    rows = []
    for config in CONFIGS:
        if "+sp" in config and gpus == 1:
            continue
        sp = gpus if "+sp" in config else 1
        cfg = method_config(config)
        kw = model_kwargs(config, sequence_parallel=sp, world=gpus, zero_stage=3, weight_bytes=2,
                          activation_bytes=2, untied_head=model.startswith("llama-3"))
        longest = longest_sequence(shape, cfg, gpu_gb * 1e9, multiple=256 * sp, **kw)
        flops = step_flops(shape, cfg, max(longest, 1), checkpointing=kw["checkpointing"])
        per_token = flops.dense if config.startswith("lora") else flops.celora
        slope = model_bytes_per_token(shape, cfg, 16384, kw)
        rows.append({"model": model, "config": config.replace("sp3", f"sp{gpus}"), "gpus": gpus, "sp": sp,
                     "longest_T": longest, "tokens_per_s": gpus * peak_tflops * 1e12 * mfu / per_token,
                     "per_token_kb": slope * sp / 1024})
    return rows


RUN_COLUMNS = ["config", "T", "peak_mb", "step_s", "step_range_s", "tokens_per_s", "loss"]
FIT_COLUMNS = ["config", "measured_T", "base_mb", "kb_per_token", "model_kb_per_token", "longest_T", "verified",
               "tokens_per_s_there"]
FORMATS = {"peak_mb": "{:.0f}", "step_s": "{:.2f}", "step_range_s": "{:.2f}", "tokens_per_s": "{:.0f}",
           "loss": "{:.3f}", "base_mb": "{:.0f}", "kb_per_token": "{:.0f}", "longest_T": "{:,}",
           "tokens_per_s_there": "{:.0f}",
           "model_kb_per_token": "{:.0f}", "per_token_kb": "{:.0f}"}


def ranks(config: str) -> int:
    """Processes a config runs on: its sequence-parallel size."""
    return int(config.rpartition("+sp")[2]) if "+sp" in config else 1


def document_rows(tokenizer, tokens: int, path: Path, n_rows: int = 4) -> None:
    """``n_rows`` alpaca rows whose output is a real-English document of at least ``tokens`` tokens
    (PIQA's goals and solutions run together), so the trainer's --seq-len cut fills the sequence."""
    from celora_dist.train.embedded import task_records

    train, held, _ = task_records()
    text = " ".join(f"{r['prompt']} {r['answer']}" for r in train + held)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < tokens * n_rows + 16:
        ids = ids + ids
    rows = [{"instruction": "Continue.", "output": tokenizer.decode(ids[i * tokens:(i + 1) * tokens + 8])}
            for i in range(n_rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def document(work: Path, tokenizer, tokens: int) -> Path:
    """``work``'s document file for ``tokens`` tokens, written on first use."""
    data = work / f"doc_{tokens}.jsonl"
    if not data.exists():
        document_rows(tokenizer, tokens, data)
    return data


def run_flags(config: str, tokens: int, steps: int, model_flags: list[str], data: Path) -> list[str]:
    """launch/train.py's flags for one run (``tokens`` already a multiple of the config's SP size)."""
    return [*model_flags, "--data", str(data), "--eval-fraction", "0.25", "--seq-len", str(tokens),
            "--micro-batch", "1", "--max-steps", str(steps), "--no-final-eval", "--no-zero-shot",
            "--dtype", "fp32", "--lr", "1e-4", *CONFIGS[config]]


def run_one(config: str, tokens: int, steps: int, model_flags: list[str], data: Path, out: Path, log,
            in_process: bool = False) -> dict:
    """One run of ``config`` at T = ``tokens`` (less the remainder SP cannot split): the measured row."""
    tokens -= tokens % ranks(config)
    flags = run_flags(config, tokens, steps, model_flags, data)
    env = {"OMP_NUM_THREADS": "1"} if ranks(config) > 1 else {}  # the same two cores in all
    done = out / "bench_flags.json"  # a finished run of the same flags in --workdir is read, not re-run
    if done.is_file() and json.loads(done.read_text()) == flags and (out / "summary.json").is_file():
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    else:
        records = run_trainer(flags, out, log, in_process=in_process and ranks(config) == 1, nproc=ranks(config),
                              env=env)
        done.write_text(json.dumps(flags))
    records = [r for r in records if "loss" in r and "eval" not in r]
    from celora_dist.train.metrics import has_telemetry

    # steady steps: not the first (start-up work) nor one where CE-LoRA refreshed, measured or timed its
    # dX backends (step 1 under the default kernel choice: 42.7 s vs 29.8 s at 4,096 tokens)
    steady = [r for r in records[1:] if not has_telemetry(r)] or records[1:] or records
    timed = [r["step_time_s"] for r in steady]
    step = statistics.median(timed)
    return {"config": config, "T": tokens, "peak_mb": max(r["peak_mem_mb"] for r in records), "step_s": step,
            "step_range_s": max(timed) - min(timed), "tokens_per_s": tokens / step, "loss": records[-1]["loss"],
            "steps_timed": len(timed)}


def fit(rows: list[dict], memory_mb: float) -> dict:
    """peak = base + slope·T (least squares), the T that fills ``memory_mb`` (all ranks of the config
    on this machine), and step time = a·T + b·T² for the tokens/s there."""
    config = rows[0]["config"]
    xs, ys = [r["T"] for r in rows], [r["peak_mb"] for r in rows]
    if len(rows) < 2:
        return {"config": config, "measured_T": str(xs[0]), "base_mb": math.nan, "kb_per_token": math.nan,
                "model_kb_per_token": math.nan,
                "longest_T": 0, "verified": "no", "tokens_per_s_there": math.nan}
    slope, base = statistics.linear_regression(xs, ys)
    longest = int((memory_mb / ranks(config) - base) / slope) if slope > 0 else 0
    longest -= longest % (256 * ranks(config))  # a round number that SP divides
    # step time a·T + b·T² through the origin: least squares on (T, T²)
    import torch

    design = torch.tensor([[x, x * x] for x in xs], dtype=torch.float64)
    times = torch.tensor([[r["step_s"]] for r in rows], dtype=torch.float64)
    a, b = torch.linalg.lstsq(design, times).solution.flatten().tolist()
    step_there = a * longest + b * longest ** 2
    return {"config": config, "measured_T": ",".join(str(x) for x in xs), "base_mb": base,
            "kb_per_token": slope * 1024, "model_kb_per_token": model_slope_kb(config, max(xs)),
            "longest_T": longest, "verified": "no",
            "tokens_per_s_there": longest / step_there if step_there > 0 else math.nan}


def model_slope_kb(config: str, tokens: int) -> float:
    """The memory model's kB per token of sequence for SmolLM2-135M under ``config`` (per rank,
    fp32), between ``tokens`` / 2 and ``tokens``: what the measured slope is checked against."""
    from celora_dist.costmodel import MODEL_SHAPES

    kw = model_kwargs(config, sequence_parallel=ranks(config), world=ranks(config))
    return model_bytes_per_token(MODEL_SHAPES["smollm2-135m"], method_config(config), tokens, kw) / 1024


def model_bytes_per_token(shape, cfg, tokens: int, kw: dict) -> float:
    """step_memory's growth per token between ``tokens`` / 2 and ``tokens`` (bytes per rank)."""
    from celora_dist.memory_model import step_memory

    low, high = step_memory(shape, cfg, tokens // 2, **kw).total, step_memory(shape, cfg, tokens, **kw).total
    return (high - low) / (tokens - tokens // 2)


def verify_lengths(text: str, configs: list[str]) -> dict[str, int | None]:
    """--verify's value: ``all``, or ``CONFIG[=T],...`` (T: the length to try first; default the fit's)."""
    if text == "all":
        return dict.fromkeys(configs)
    out: dict[str, int | None] = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        name, _, tokens = item.partition("=")
        if name not in configs:
            raise SystemExit(f"error: --verify names {name!r}, which is not among --configs")
        try:
            out[name] = int(tokens) if tokens else None
        except ValueError:
            raise SystemExit(f"error: --verify {item!r}: the length after '=' must be an integer") from None
    return out


def verify(fit_row: dict, tries: int, model_flags: list[str], tokenizer, work: Path, runs: list[dict], log) -> None:
    """Train 2 steps at the fit's longest T; a run the kernel kills for memory (SIGKILL: no swap
    here) is recorded and retried 20 % shorter, ``tries`` lengths in all."""
    config, tokens = fit_row["config"], fit_row["longest_T"]
    killed = []
    for _ in range(tries):
        data = document(work, tokenizer, tokens)
        out = work / f"{config}_{tokens}"
        marker = out / "bench_killed.json"  # a length killed before, with the same flags: not tried again
        flags = run_flags(config, tokens, 2, model_flags, data)
        try:
            if marker.is_file() and json.loads(marker.read_text()) == flags:
                raise SystemExit("rc=-9 (recorded in an earlier run of this bench)")
            row = run_one(config, tokens, 2, model_flags, data, out, log)
        except SystemExit as failed:
            if "rc=-9" not in str(failed) and "rc=137" not in str(failed):
                raise
            out.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(flags))
            killed.append(tokens)
            log(f"{config} T={tokens}: killed (out of memory)")
            tokens = int(tokens * 0.8) // (256 * ranks(config)) * (256 * ranks(config))
            continue
        runs.append(row)
        fit_row.update(longest_T=tokens, tokens_per_s_there=row["tokens_per_s"],
                       verified=f"yes: {row['peak_mb']:.0f} MB"  # rank 0's peak (not x ranks: peaks differ in time)
                                + (f" on rank 0 of {ranks(config)}" if ranks(config) > 1 else "")
                                + (f"; killed at {', '.join(f'{t:,}' for t in killed)}" if killed else ""))
        return
    fit_row.update(verified=f"killed at {', '.join(f'{t:,}' for t in killed)}", tokens_per_s_there=math.nan)


def machine_memory_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("error: /proc/meminfo has no MemTotal; pass --memory-gb")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1024,2048,4096", help="sequence lengths to measure (comma list)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of: {', '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--memory-gb", type=float, default=None, help="memory the projection fills (default: MemTotal - 1 GB)")
    p.add_argument("--verify", nargs="?", const="all", default=None, metavar="CONFIGS",
                   help="train 2 steps at the projected longest T of these configs (comma list, CONFIG=T to "
                        "choose the length; bare: all)")
    p.add_argument("--verify-tries", type=int, default=2,
                   help="--verify: lengths tried per config (each after a killed run is 20%% shorter)")
    p.add_argument("--verify-max-tokens", type=int, default=16384,
                   help="--verify skips configs whose projected longest T is above this (the time it would take)")
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--smoke", action="store_true",
                   help="64/128 tokens, 2 steps, single-rank runs in this process (with --model: the test's tiny model)")
    p.add_argument("--predict", default=None, metavar="MODEL",
                   help="only the memory model's table for MODEL (celora_dist.costmodel.MODEL_SHAPES), e.g. llama-3-8b")
    p.add_argument("--gpus", type=int, default=8, help="--predict: GPUs (ZeRO-3 over all; the +sp rows use SP = all)")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="--predict: memory per GPU (GB, 1e9 bytes)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="--predict: dense bf16 peak per GPU (H100 SXM)")
    p.add_argument("--mfu", type=float, default=0.4, help="--predict: assumed share of the peak a step sustains")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="passed to the trainer: its no-progress watchdog (default 600 s) stops a run whose one "
                        "step takes longer (26,624 tokens with checkpointing took > 600 s a step on 2 CPU cores)")
    p.add_argument("--json", default=None, help="write the rows and fits to this file")
    p.add_argument("--workdir", default=None,
                   help="run folders (default: a temporary folder); finished runs there are reused")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: unknown --configs {unknown}; choose from {', '.join(CONFIGS)}")
    try:
        lengths = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"error: --tokens must be a comma list of integers, got {args.tokens!r}") from None
    if args.smoke:
        lengths, args.steps = [64, 128], 2
    if args.predict:
        rows = predict(args.predict, args.gpus, args.gpu_gb, args.peak_tflops, args.mfu)
        print(f"memory model (no run): {args.predict} on {args.gpus} x {args.gpu_gb:g} GB, bf16, ZeRO-3, "
              f"tokens/s at {args.mfu:.0%} of {args.peak_tflops:g} TFLOPS per GPU")
        print(markdown_table(rows, PREDICT_COLUMNS, FORMATS))
        return {"predict": rows}
    memory_mb = args.memory_gb * 1024 if args.memory_gb else machine_memory_mb() - 1024
    from transformers import AutoTokenizer

    from celora_dist.train.embedded import ensure_model

    model_dir = args.model or str(ensure_model(verbose=False))
    model_flags = ["--model", model_dir] + (["--dist-timeout", f"{args.dist_timeout:g}"] if args.dist_timeout else [])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    log = (lambda s: None) if args.smoke else (lambda s: print(s, file=sys.stderr, flush=True))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="long_context_"))
    work.mkdir(parents=True, exist_ok=True)
    runs, fits = [], []
    for config in configs:
        rows = []
        for tokens in lengths:
            data = document(work, tokenizer, tokens)
            t0 = time.perf_counter()
            rows.append(run_one(config, tokens, args.steps, model_flags, data, work / f"{config}_{tokens}",
                                log, in_process=args.smoke))
            log(f"{config} T={tokens}: peak {rows[-1]['peak_mb']:.0f} MB, {rows[-1]['tokens_per_s']:.0f} tokens/s "
                f"({time.perf_counter() - t0:.0f} s)")
        runs += rows
        fits.append(fit(rows, memory_mb))
    if args.verify:
        chosen = verify_lengths(args.verify, configs)
        for f in fits:
            if f["config"] in chosen:
                f["longest_T"] = chosen[f["config"]] or f["longest_T"]
                if 0 < f["longest_T"] <= args.verify_max_tokens:
                    verify(f, args.verify_tries, model_flags, tokenizer, work, runs, log)
    print(f"memory the projection fills: {memory_mb:.0f} MB; {os.cpu_count()} CPU threads")
    print(markdown_table(runs, RUN_COLUMNS, FORMATS))
    print()
    print(markdown_table(fits, FIT_COLUMNS, FORMATS))
    result = {"memory_mb": memory_mb, "runs": runs, "fits": fits, "steps": args.steps}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
