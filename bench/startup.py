"""Start-up: launch -> first optimizer step of launch/train.py, and the SVD split's share of it.

    python bench/startup.py                     # LLaMA-3.2-1B-shaped random weights (16 blocks)
    python bench/startup.py --blocks 4          # fewer blocks of the same shapes

Builds (once, in --workdir) a LlamaForCausalLM with LLaMA-3.2-1B's block shapes (hidden 2048,
intermediate 8192, 32 heads, 8 KV heads; a 32,000-token vocabulary instead of 128,256: the
embedding is not an approximate layer) and random weights, then times one-step runs of the
trainer for each split method (exact, randomized), at 1 and 2 ranks, cold (empty factor cache)
and cached (the cache the cold run filled). Reports the wall time of the whole one-step run
(launch, load, split, engine, the step, a LoRA-only checkpoint and adapter), the SVD phase (the trainer's
"SVD of frozen weights" progress bar on rank 0) and the first step itself.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_model(folder: Path, blocks: int) -> None:
    if (folder / "config.json").is_file():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from tests.train_utils import make_tokenizer

    tok = make_tokenizer(folder)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=blocks,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)


def one(work: Path, model: Path, data: Path, svd: str, ranks: int, cache: Path) -> dict:
    out = work / f"run-{svd}-{ranks}"
    shutil.rmtree(out, ignore_errors=True)
    args = ["--model", str(model), "--data", str(data), "--max-steps", "1", "--micro-batch", "1",
            "--seq-len", "64", "--svd", svd, "--factor-cache", str(cache), "--no-zero-shot", "--no-final-eval",
            "--output-dir", str(out)]
    cmd = ([sys.executable, str(REPO / "launch/train.py")] if ranks == 1 else
           [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), str(REPO / "launch/train.py")])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + args, capture_output=True, text=True, cwd=REPO,
                          env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})
    total = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"run failed ({svd}, {ranks} ranks):\n{proc.stderr[-3000:]}")
    bars = re.findall(r"SVD of frozen weights[^\[]*\[(\d+):(\d+)", proc.stderr + proc.stdout)
    svd_s = int(bars[-1][0]) * 60 + int(bars[-1][1]) if bars else 0.0
    record = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' not in line)
    return {"total_s": total, "svd_s": svd_s, "first_step_s": record["step_time_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--workdir", default="/tmp/celora_startup")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--methods", default="exact,randomized")
    a = p.parse_args()
    work = Path(a.workdir)
    model = work / f"llama1b-shaped-{a.blocks}"
    build_model(model, a.blocks)
    data = work / "alpaca.json"
    sys.path.insert(0, str(REPO))
    from tests.train_utils import alpaca_rows

    data.write_text(json.dumps(alpaca_rows(64)))
    print(f"{'svd':<11} {'ranks':>5} {'cache':<7} {'launch->end s':>13} {'SVD s':>6} {'1st step s':>10}", flush=True)
    for svd in a.methods.split(","):
        for ranks in (int(r) for r in a.ranks.split(",")):
            cache = work / f"cache-{svd}-{ranks}"
            shutil.rmtree(cache, ignore_errors=True)
            for case in ("cold", "cached"):
                r = one(work, model, data, svd, ranks, cache)
                print(f"{svd:<11} {ranks:>5} {case:<7} {r['total_s']:>13.1f} {r['svd_s']:>6.0f} "
                      f"{r['first_step_s']:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
