"""TRL SFTTrainer step time: CE-LoRA through celora_dist.for_trainer vs PEFT LoRA, same script.

    python bench/trl_step.py                     # embedded SmolLM2-135M, PIQA chats, packing, 8 steps x 2 rounds

Each (method, round) runs in its own process (a fresh Trainer, interleaved: peft, celora,
peft, celora, ...); the per-step times come from a TrainerCallback (step begin -> end), the
first step of each run is dropped (warm-up), and the table gives medians, the speed-up over
PEFT and the FLOP ceiling of docs/design.md §3 for the config (celora_dist.costmodel).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(method: str, steps: int, micro: int, max_length: int, refresh: int) -> list[float]:
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    import celora_dist
    from celora_dist import CELoRAConfig
    from celora_dist.adapters import peft_lora_config
    from celora_dist.train.embedded import ensure_model, task_records

    model_dir = ensure_model(verbose=False)
    train, _, _ = task_records()
    chats = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]}
             for r in train[:400]]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = CELoRAConfig(refresh_every=refresh)
    callbacks = []
    if method == "celora":
        model, callback = celora_dist.for_trainer(model, cfg, verbose=False)
        callbacks.append(callback)
    else:  # the same LoRA (r, alpha, rsLoRA, targets) as plain PEFT
        model = get_peft_model(model, peft_lora_config(cfg, list(cfg.target_modules)))
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    config = SFTConfig(output_dir=f"/tmp/trl_step_{method}", max_steps=steps, per_device_train_batch_size=micro,
                       learning_rate=1e-4, packing=True, max_length=max_length, bf16=False,
                       gradient_checkpointing=False, report_to=[], save_strategy="no", disable_tqdm=True,
                       logging_steps=10_000)
    SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(chats),
               processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=callbacks + [Timer()]).train()
    return times[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--refresh-every", type=int, default=4)
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._one:
        print("TIMES " + json.dumps(one_run(a._one, a.steps, a.micro, a.max_length, a.refresh_every)))
        return
    print(f"{a.rounds} rounds x {a.steps} steps per method, micro-batch {a.micro}, packing to {a.max_length} tokens, "
          f"refresh every {a.refresh_every}; torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}", flush=True)
    steps: dict[str, list[float]] = {"peft": [], "celora": []}
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    for _ in range(a.rounds):
        for method in steps:
            out = subprocess.run([sys.executable, __file__, "--_one", method, "--steps", str(a.steps), "--micro",
                                  str(a.micro), "--max-length", str(a.max_length), "--refresh-every",
                                  str(a.refresh_every)], capture_output=True, text=True, env=env, cwd=REPO)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("TIMES ")]
            if out.returncode or not line:
                sys.exit(f"{method} run failed:\n{out.stderr[-3000:]}")
            steps[method] += json.loads(line[0][6:])
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from celora_dist import CELoRAConfig
    from celora_dist.costmodel import flop_ceiling
    from celora_dist.train.embedded import ensure_model

    with torch.device("meta"):
        probe = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ensure_model(verbose=False)))
    ceiling = flop_ceiling(probe, CELoRAConfig(refresh_every=a.refresh_every)).ratio
    peft, celora = statistics.median(steps["peft"]), statistics.median(steps["celora"])
    print(f"{'method':<8} {'step_s':>8} {'steps':>6}")
    for name, value in (("peft", peft), ("celora", celora)):
        print(f"{name:<8} {value:>8.3f} {len(steps[name]):>6}")
    print(f"speed-up of CE-LoRA over PEFT LoRA: {peft / celora:.3f}x (FLOP ceiling {ceiling:.3f}x)")


if __name__ == "__main__":
    main()
