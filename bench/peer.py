"""This trainer beside what a user would run instead: same model, tokens, micro-batch and steps.

    python bench/peer.py                         # embedded SmolLM2-135M, 512-token examples, micro-batch 4,
                                                 # 8 steps x 2 rounds
    python bench/peer.py --model DIR --smoke     # a tiny model, in this process: for the test suite

Configurations, each run in its own process (``--in-process``: in this one), interleaved
round by round (round 1: every configuration, then round 2, ...), every process with the same
``OMP_NUM_THREADS`` (``--threads``, default all cores of this process's affinity):

- ``launch/train.py`` (one process, DeepSpeed ZeRO-2 on the CPU accelerator) with ``--method lora``
  and with CE-LoRA (released config), each eager and with ``--compile`` (engine.compile, inductor);
- HF ``Trainer`` + PEFT LoRA (the same r, alpha, rsLoRA and target modules, ``peft_lora_config``);
- TRL ``SFTTrainer`` with packing (bfd, padding-free) + the same PEFT LoRA.

Same tokens: the records are alpaca rows whose prompts (PIQA questions run together) overflow
``--seq-len``, so the trainer's own tokenizer truncates every example to exactly ``--seq-len``
tokens; HF and TRL get those very token ids, pre-tokenized. Every step therefore trains
micro-batch x seq-len tokens in every configuration (checked: each row's measured tokens per
step). Step time: this trainer's metrics.jsonl ``step_time_s`` (forward, backward, engine.step,
the CE-LoRA schedule); HF/TRL a callback from step begin to step end (forward, backward,
clipping, optimizer) — both exclude data loading. The first ``--warmup`` steps of every run are
dropped (compilation; CE-LoRA's exact refresh step 0 and its backend measurement on step 1);
``first_step_s`` shows what the first step cost. Table: median step over the timed steps of all
rounds with its interquartile range; ``vs_hf`` = HF Trainer + PEFT's median / this median.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, also when loaded by path
from _common import iqr, markdown_table  # noqa: E402  (puts the checkout on sys.path too)
from _trainer_runs import ROOT, run_env, run_trainer  # noqa: E402

CONFIGS = ("hf-peft-lora", "trl-sft-packing-peft-lora", "lora", "lora-compile", "celora", "celora-compile")
COLUMNS = ["config", "trainer", "step_ms", "step_iqr_ms", "tokens_per_step", "tokens_per_s", "first_step_s",
           "timed_steps", "vs_hf"]
FORMATS = {"step_ms": "{:.0f}", "step_iqr_ms": "{:.0f}", "tokens_per_step": "{:.0f}", "tokens_per_s": "{:.0f}",
           "first_step_s": "{:.1f}",
           "vs_hf": "{:.3f}x"}
TRAINER = {"hf-peft-lora": "HF Trainer + PEFT", "trl-sft-packing-peft-lora": "TRL SFTTrainer (packing) + PEFT"}


def build_records(model_dir: str, seq_len: int, n: int) -> list[dict]:
    """``n`` alpaca records that the trainer's tokenizer truncates to exactly ``seq_len`` tokens."""
    from transformers import AutoTokenizer

    from celora_dist.train.data import example_ids, to_record
    from celora_dist.train.embedded import task_records

    piqa, _, _ = task_records()
    tok = AutoTokenizer.from_pretrained(model_dir)
    records, i = [], 0
    while len(records) < n:
        text = []
        while len(tok(" ".join(text))["input_ids"]) < seq_len + 8:  # overflow: the prompt gets truncated
            text.append(piqa[i % len(piqa)]["prompt"])
            i += 1
        row = {"instruction": " ".join(text), "input": "", "output": piqa[i % len(piqa)]["answer"]}
        ids, _ = example_ids(tok, to_record(row, "peer"), seq_len)
        assert len(ids) == seq_len, (len(ids), seq_len)
        records.append(row)
    return records


def tokenized(model_dir: str, data: Path, seq_len: int) -> list[dict]:
    """The trainer's own token ids and labels of ``data`` (what HF and TRL are given)."""
    from transformers import AutoTokenizer

    from celora_dist.train.data import example_ids, read_records

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [dict(zip(("input_ids", "labels"), example_ids(tok, r, seq_len))) for r in read_records(data)]


def run_peer(config: str, model_dir: str, data: Path, a: argparse.Namespace, out: Path) -> dict:
    """One HF Trainer / TRL SFTTrainer run with PEFT LoRA: per-step seconds and tokens."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from celora_dist import CELoRAConfig
    from celora_dist.adapters import peft_lora_config

    cfg = CELoRAConfig()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, peft_lora_config(cfg, list(cfg.target_modules)))
    rows = tokenized(model_dir, data, a.seq_len)
    times: list[float] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.t0)

    common = dict(output_dir=str(out), max_steps=a.steps, per_device_train_batch_size=a.micro_batch,
                  learning_rate=a.lr, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                  disable_tqdm=True, logging_steps=10**6, use_cpu=True, seed=0, dataloader_num_workers=0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if config == "hf-peft-lora":
        data_rows = [{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows]
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=Dataset.from_list(data_rows),
                          callbacks=[Timer()])
    else:
        from trl import SFTConfig, SFTTrainer

        data_rows = [{"input_ids": r["input_ids"], "completion_mask": [int(t != -100) for t in r["labels"]]}
                     for r in rows]
        trainer = SFTTrainer(model=model, args=SFTConfig(**common, packing=True, max_length=a.seq_len, bf16=False,
                                                         gradient_checkpointing=False),
                             train_dataset=Dataset.from_list(data_rows), processing_class=tok, callbacks=[Timer()])
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    trainer.train()
    return {"times": times, "tokens": tokens}


def run_ours(config: str, model_dir: str, data: Path, a: argparse.Namespace, out: Path) -> dict:
    """One launch/train.py run (single process): per-step seconds and tokens from metrics.jsonl."""
    method = "celora" if config.startswith("celora") else "lora"
    flags = ["--model", model_dir, "--data", str(data), "--method", method, "--max-steps", str(a.steps),
             "--micro-batch", str(a.micro_batch), "--seq-len", str(a.seq_len), "--lr", str(a.lr),
             "--lr-schedule", "constant", "--no-final-eval", "--factor-cache", str(a.workdir / "factors")]
    if config.endswith("-compile"):
        flags += ["--compile", a.compile_backend]
    log = (lambda text: print(text, file=sys.stderr, flush=True)) if a.verbose else (lambda text: None)
    saved = dict(os.environ)
    try:
        records = run_trainer(flags, out, log, in_process=a.in_process)
    finally:  # in-process: the trainer's world-of-one variables must not leak into the HF runs
        os.environ.clear()
        os.environ.update(saved)
    steps = [r for r in records if "eval" not in r and "step_time_s" in r]
    return {"times": [r["step_time_s"] for r in steps], "tokens": [r["tokens"] for r in steps]}


def one_run(config: str, model_dir: str, data: Path, a: argparse.Namespace, out: Path) -> dict:
    if config not in CONFIGS:
        raise SystemExit(f"error: unknown configuration {config!r}; choose from {', '.join(CONFIGS)}")
    if a.in_process:
        import torch

        torch._dynamo.reset()  # each run compiles from scratch, as its own process would
    run = run_peer if config in TRAINER else run_ours
    return run(config, model_dir, data, a, out)


def spawn(config: str, round_: int, model_dir: str, data: Path, a: argparse.Namespace) -> dict:
    """``one_run`` in a fresh process (the default): its result comes back as a JSON line."""
    cmd = [sys.executable, __file__, "--_one", config, "--model", model_dir, "--_data", str(data),
           "--workdir", str(a.workdir), "--steps", str(a.steps), "--micro-batch", str(a.micro_batch),
           "--seq-len", str(a.seq_len), "--lr", str(a.lr), "--compile-backend", a.compile_backend]
    env = {**run_env(), "OMP_NUM_THREADS": str(a.threads)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEER ")]
    if proc.returncode or not line:
        raise SystemExit(f"error: {config} (round {round_}) failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(line[-1][5:])


def summarize(results: dict[str, list[dict]], warmup: int, expected_tokens: int) -> list[dict]:
    rows = []
    for config, runs in results.items():
        timed = [t for run in runs for t in run["times"][warmup:]]
        tokens = [n for run in runs for n in run["tokens"]]
        if not timed:
            raise SystemExit(f"error: {config}: no step left after --warmup {warmup}")
        per_step = statistics.median(tokens) if tokens else float("nan")
        if tokens and (min(tokens) != expected_tokens or max(tokens) != expected_tokens):
            raise SystemExit(f"error: {config} trained {min(tokens)}-{max(tokens)} tokens per step, expected "
                             f"{expected_tokens}: the configurations would not see the same tokens")
        step = statistics.median(timed)
        rows.append({"config": config, "trainer": TRAINER.get(config, "launch/train.py"), "step_ms": 1e3 * step,
                     "step_iqr_ms": 1e3 * iqr(timed), "tokens_per_step": per_step, "tokens_per_s": per_step / step,
                     "first_step_s": statistics.median(run["times"][0] for run in runs), "timed_steps": len(timed),
                     "steps_s": [run["times"] for run in runs]})
    hf = next(r["step_ms"] for r in rows if r["config"] == "hf-peft-lora")
    for row in rows:
        row["vs_hf"] = hf / row["step_ms"]
    return rows


def machine() -> dict:
    from _common import _cpu_model

    return {"cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg(),
            "python": platform.python_version()}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per example (every example has exactly this many)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="first steps of each run not timed")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--compile-backend", default="inductor", help="the backend of the -compile configurations")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="OMP_NUM_THREADS of every run")
    p.add_argument("--in-process", action="store_true", help="run every configuration in this process")
    p.add_argument("--workdir", type=Path, default=None, help="run folders (default: a temporary folder, removed)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON rows here (default: bench/results/peer_<date>_<cpu>-<threads>t.json)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, one round, in this process, backend eager (Dynamo alone): for the test "
                        "suite (needs --model)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_data", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._one:  # a child process: one configuration, result on stdout
        result = one_run(a._one, a.model, Path(a._data), a, a.workdir / f"{a._one}-{os.getpid()}")
        print("PEER " + json.dumps(result), flush=True)
        return []
    if a.smoke:
        if a.model is None:
            p.error("--smoke needs --model (a tiny model folder)")
        a.seq_len, a.micro_batch, a.steps, a.warmup, a.rounds = 24, 2, 2, 1, 1
        a.in_process, a.compile_backend = True, "eager"
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or "hf-peft-lora" not in configs:
        p.error(f"--configs: unknown {bad}" if bad else "--configs must include hf-peft-lora (the reference)")
    if a.steps <= a.warmup:
        p.error(f"--steps {a.steps} leaves nothing to time after --warmup {a.warmup}")
    if a.model is None:
        from celora_dist.train.embedded import ensure_model

        a.model = str(ensure_model(verbose=False))
    tmp = None
    if a.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="celora-peer-")
        a.workdir = Path(tmp.name)
    a.workdir.mkdir(parents=True, exist_ok=True)
    if a.in_process:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
        import torch

        torch.set_num_threads(a.threads)
    data = a.workdir / "peer.jsonl"
    # the trainer holds out 10% for evaluation: enough records for every step's micro-batch
    records = build_records(a.model, a.seq_len, n=int(a.steps * a.micro_batch / 0.85) + 2)
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    start_load = os.getloadavg()
    print(f"peer: {Path(a.model).name}, {a.seq_len}-token examples x micro-batch {a.micro_batch}, {a.steps} steps "
          f"({a.warmup} warm-up) x {a.rounds} rounds, OMP_NUM_THREADS={a.threads} per run, "
          f"{'in-process' if a.in_process else 'one process per run'}; load average {start_load[0]:.2f}",
          file=sys.stderr, flush=True)
    results: dict[str, list[dict]] = {c: [] for c in configs}
    t = time.perf_counter()
    try:
        for r in range(a.rounds):
            for config in configs:
                if a.in_process:
                    result = one_run(config, a.model, data, a, a.workdir / f"{config}-{r}")
                else:
                    result = spawn(config, r, a.model, data, a)
                results[config].append(result)
                if a.verbose or not a.smoke:
                    print(f"round {r + 1}: {config} median {statistics.median(result['times'][a.warmup:]):.3f} s/step",
                          file=sys.stderr, flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    rows = summarize(results, a.warmup, a.micro_batch * a.seq_len)
    table = markdown_table(rows, COLUMNS, FORMATS)
    print(table)
    print(f"{a.rounds} round(s) x {a.steps - a.warmup} timed steps per configuration; step_iqr_ms = interquartile "
          f"range of those steps; vs_hf = HF Trainer + PEFT LoRA step / this step; "
          f"wall {time.perf_counter() - t:.0f} s")
    if not a.smoke or a.out is not None:
        info = {**machine(), "load_avg_start": start_load, "threads": a.threads}
        out = a.out or ROOT / "bench" / "results" / (
            f"peer_{date.today().isoformat()}_{'-'.join(info['cpu'].split()[:2]).lower()}-{a.threads}t.json")
        out.write_text(json.dumps({"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                                                if not k.startswith("_")},
                                   "machine": info, "table": table, "rows": rows}, indent=1))
        print(f"rows written to {out}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
