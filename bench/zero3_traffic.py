"""ZeRO-3 frozen-weight traffic: bytes all-gathered per optimizer step, LoRA (the trainer's --method lora) vs CE-LoRA.

    python bench/zero3_traffic.py                       # tiny test model (tests/train_utils.py), ~2 min
    python bench/zero3_traffic.py --model smollm2       # the embedded SmolLM2-135M, a few minutes
    python bench/zero3_traffic.py --model PATH --data FILE
    python bench/zero3_traffic.py --scale               # LLaMA-3-8B / 70B from the shapes, no runs

Each case is a real ``launch/train.py`` run under ``deepspeed --num_gpus 2`` (DS_ACCELERATOR=cpu,
gloo) with ds_configs/zero3.json plus DeepSpeed's communication logger ("comms_logger",
prof_all). The worker (this file, ``--worker``) wraps DeepSpeedEngine.forward / backward / step
and charges the logger's byte counts to the phase and optimizer step they fell in. Bytes are
counts, not times: a busy machine does not change them.

Two ZeRO-3 regimes, because DeepSpeed decides from the model size whether the backward
re-gathers at all:
  default   ds_configs/zero3.json as is (stage3_max_reuse_distance 1e9 parameters,
            stage3_prefetch_bucket_size 5e7): once the first step has recorded the trace, a weight
            whose backward use lies within the reuse distance, or that the prefetcher reached
            while it was still gathered, is kept from its forward to its backward use. A small
            model keeps every weight: no backward all-gather in steady state.
  release   stage3_max_reuse_distance 0 and stage3_prefetch_bucket_size 0: every weight is
            released after each use and re-gathered for the backward, which is what happens to
            nearly all layers of an 8B/70B model under the defaults (docs/design.md §2,
            "ZeRO-3 frozen-weight traffic").

Columns (per rank, bytes assembled on that rank; the last, steady-state step):
  ag_fwd, ag_bwd, ag_total   all-gather bytes in engine.forward / engine.backward / the whole step
  rs                         reduce-scatter input bytes (gradient reduction: trainable LoRA only)
  ideal_ag                   CE-LoRA's all-gather if its backward gathered only W0[I] (+ B0, A0):
                             ag_total - sum over approximate layers of (m - k) * n * bytes,
                             i.e. W0 x (1 + keep) instead of x 2 (only where the backward re-gathers)
  vs_lora                    ag_total / LoRA's ag_total;  ideal_vs_lora: ideal_ag / LoRA's ag_total
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TRAIN = ROOT / "launch" / "train.py"
ZERO3 = ROOT / "ds_configs" / "zero3.json"
COLUMNS = ["model", "regime", "method", "ag_fwd", "ag_bwd", "ag_total", "rs", "ideal_ag", "vs_lora",
           "ideal_vs_lora"]


# ---- worker: one training run under the DeepSpeed launcher ---------------------------------
def _phase_totals() -> dict[str, int]:
    """Bytes per raw op so far, as the comms logger counts them (per-rank message size x count);
    all-gathers are scaled to the bytes the rank assembles (message x world size)."""
    import deepspeed.comm as dist
    from deepspeed.comm.comm import comms_logger

    world = dist.get_world_size()
    out: dict[str, int] = {}
    for name, sizes in comms_logger.comms_dict.items():
        op = name.split("|")[0]
        scale = world if op.startswith("all_gather") else 1
        out[op] = out.get(op, 0) + sum(size * rec[0] for size, rec in sizes.items()) * scale
    return out


def worker(result: Path, argv: list[str]) -> None:
    import importlib.util

    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    records: dict[int, dict[str, dict[str, int]]] = {}
    last = {"snap": {}}

    def charge(step: int, phase: str) -> None:
        now = _phase_totals()
        delta = {op: b - last["snap"].get(op, 0) for op, b in now.items() if b != last["snap"].get(op, 0)}
        last["snap"] = now
        if delta:
            bucket = records.setdefault(step, {}).setdefault(phase, {})
            for op, b in delta.items():
                bucket[op] = bucket.get(op, 0) + b

    def wrap(name: str):
        original = getattr(DeepSpeedEngine, name)

        def wrapped(self, *args, **kwargs):
            step = self.global_steps
            charge(step, "other")
            phase = name if (name != "forward" or torch.is_grad_enabled()) else "other"
            try:
                return original(self, *args, **kwargs)
            finally:
                charge(step, phase)

        setattr(DeepSpeedEngine, name, wrapped)

    for name in ("forward", "backward", "step"):
        wrap(name)
    spec = importlib.util.spec_from_file_location("celora_launch_train", TRAIN)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    try:
        train.main(argv)
    finally:
        import deepspeed.comm as dist

        if dist.is_initialized() and dist.get_rank() == 0:
            charge(max(records, default=0), "other")
            result.write_text(json.dumps({str(k): v for k, v in sorted(records.items())}, indent=1))


# ---- the same bytes at LLaMA-3 scale, from the shapes alone ----------------------------------
SCALE_MODELS = {  # hidden, intermediate, layers, q heads x head dim, k/v outputs (GQA)
    "LLaMA-3-8B": (4096, 14336, 32, 4096, 1024),
    "LLaMA-3-70B": (8192, 28672, 80, 8192, 1024),
}
SCALE_COLUMNS = ["model", "lora_gb", "celora_gb", "row_sparse_gb", "saved_gb", "row_sparse_vs_lora"]


def scale_rows(bytes_per: int = 2, r_lora: int = 16, r: int = 14, r0: int = 14) -> list[dict]:
    """All-gathered bytes per rank per optimizer step of the decoder's linear layers (W0 and the
    adapters; embeddings, head and norms are the same for every method and left out) when every
    weight is re-gathered for the backward, bf16, released config:
      lora        2 x (W0 + A, B at r = 16)
      celora      2 x (W0 + A, B at r = 14 + B0, A0 on approximate layers): today's ZeRO-3
      row_sparse  forward W0 + A, B; backward W0[I] + A, B + B0, A0 (k = ceil(keep m) rows)."""
    from celora_dist.config import RELEASED_KEEP, num_kept

    rows = []
    for name, (h, inter, layers, q, kv) in SCALE_MODELS.items():
        shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                  "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
        lora = celora = sparse = 0
        for proj, (m, n) in shapes.items():
            w0, adapters = m * n, (m + n)
            lora += 2 * (w0 + r_lora * adapters)
            if proj in RELEASED_KEEP:
                k = num_kept(RELEASED_KEEP[proj], m)
                celora += 2 * (w0 + r * adapters + r0 * adapters)
                sparse += w0 + 2 * r * adapters + k * n + r0 * adapters
            else:
                celora += 2 * (w0 + r * adapters)
                sparse += 2 * (w0 + r * adapters)
        gb = layers * bytes_per / 1e9
        rows.append({"model": name, "lora_gb": lora * gb, "celora_gb": celora * gb, "row_sparse_gb": sparse * gb,
                     "saved_gb": (celora - sparse) * gb, "row_sparse_vs_lora": sparse / lora})
    return rows


def print_scale() -> None:
    print("decoder linear layers, bf16, all-gather bytes per rank per optimizer step (GB = 1e9 B), "
          "every weight re-gathered for the backward")
    print("| " + " | ".join(SCALE_COLUMNS) + " |")
    print("|" + "---|" * len(SCALE_COLUMNS))
    for row in scale_rows():
        print("| " + " | ".join(row["model"] if c == "model" else f"{row[c]:.3f}" if c.endswith("lora") and
                                c != "lora_gb" else f"{row[c]:.2f}" for c in SCALE_COLUMNS) + " |")


# ---- driver ---------------------------------------------------------------------------------
def ds_config(folder: Path, regime: str) -> Path:
    cfg = json.loads(ZERO3.read_text())
    cfg["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True}
    if regime == "release":  # nothing kept between uses, nothing prefetched ahead
        cfg["zero_optimization"].update(stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
    path = folder / f"zero3_{regime}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def run_case(model_flags: list[str], method: str, regime: str, folder: Path, steps: int) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    from _trainer_runs import run_env
    from tests.train_utils import free_port

    result = folder / f"{method}_{regime}.json"
    out = folder / f"run_{method}_{regime}"
    flags = [*model_flags, "--method", method, "--max-steps", str(steps), "--deepspeed_config",
             str(ds_config(folder, regime)), "--output-dir", str(out), "--overwrite-output-dir",
             "--no-zero-shot", "--no-final-eval", "--no-factor-cache"]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(free_port()), str(Path(__file__).resolve()), "--worker", str(result), "--", *flags]
    env = run_env()
    env["OMP_NUM_THREADS"] = "1"
    print(f"$ {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result.exists():
        raise SystemExit(f"run failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(result.read_text()).items()}


def row_savings(model_dir: Path, bytes_per: int) -> int:
    """Bytes per step a row-sparse backward would not gather: sum over approximate layers of
    (m - k) * n, k = ceil(keep * m) (celora_dist.config.num_kept)."""
    from celora_dist.config import RELEASED_KEEP, num_kept

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // heads
    shapes = {"q_proj": (heads * hd, h), "k_proj": (kv * hd, h), "v_proj": (kv * hd, h), "o_proj": (h, heads * hd),
              "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    saved = 0
    for name, (m, n) in shapes.items():
        if name in RELEASED_KEEP:  # the released config: q, k, gate exact
            saved += (m - num_kept(RELEASED_KEEP[name], m)) * n
    return saved * layers * bytes_per


def summarize(model: str, regime: str, recs: dict[str, dict], saved: int) -> list[dict]:
    rows = []
    for method in ("lora", "celora"):
        steady = recs[method][max(recs[method])]

        def op_bytes(phase: str, prefix: str) -> int:
            return sum(b for op, b in steady.get(phase, {}).items() if op.startswith(prefix))

        # the step's own phases; "other" is start-up, the end-of-run save and metrics
        ag_total = sum(op_bytes(p, "all_gather") for p in ("forward", "backward", "step"))
        rs = sum(op_bytes(p, "reduce_scatter") for p in ("forward", "backward", "step"))
        bwd = op_bytes("backward", "all_gather")
        ideal = ag_total - saved if method == "celora" and bwd > 0 else ag_total
        rows.append({"model": model, "regime": regime, "method": method, "ag_fwd": op_bytes("forward", "all_gather"),
                     "ag_bwd": bwd, "ag_total": ag_total, "rs": rs, "ideal_ag": ideal})
    lora_total = rows[0]["ag_total"]
    for row in rows:
        row["vs_lora"] = row["ag_total"] / lora_total if lora_total else math.nan
        row["ideal_vs_lora"] = row["ideal_ag"] / lora_total if lora_total else math.nan
    return rows


def mb(value) -> str:
    if not isinstance(value, int):
        return f"{value:.3f}"
    return f"{value / 2**20:.2f} MiB" if value >= 10 * 2**20 else f"{value / 2**10:.1f} KiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (tests/train_utils.py), smollm2 (embedded), or a folder")
    p.add_argument("--data", default=None, help="training file for --model FOLDER")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the last is reported)")
    p.add_argument("--regimes", default="default,release", help="ZeRO-3 regimes to run (see above)")
    p.add_argument("--keep-dir", default=None, help="keep the runs' folders here (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the per-step, per-phase records here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--scale", action="store_true", help="only print the 8B/70B figures from the shapes")
    args, unknown = p.parse_known_args()
    if args.scale:
        print_scale()
        return
    if args.worker:
        worker(Path(args.worker), [a for a in args.rest + unknown if not a.startswith("--local_rank")])
        return

    folder = Path(args.keep_dir or tempfile.mkdtemp(prefix="z3traffic_"))
    folder.mkdir(parents=True, exist_ok=True)
    if args.model == "tiny":
        from tests.train_utils import TINY_FLAGS, make_assets

        assets = make_assets(folder / "assets")
        model_dir = assets["model"]
        model_flags = ["--model", str(model_dir), "--data", str(assets["mc"]), "--micro-batch", "2",
                       *TINY_FLAGS]
    elif args.model == "smollm2":
        from celora_dist.train.embedded import ensure_model

        model_dir = ensure_model(verbose=False)
        model_flags = ["--seq-len", "64", "--micro-batch", "2"]
    else:
        model_dir = Path(args.model)
        model_flags = ["--model", args.model, "--data", args.data, "--seq-len", "64", "--micro-batch", "2"]

    saved = row_savings(model_dir, 4)  # fp32 (ds_configs/zero3.json: bf16 auto -> off)
    rows, raw = [], {}
    for regime in args.regimes.split(","):
        recs = {m: run_case(model_flags, m, regime, folder, args.steps) for m in ("lora", "celora")}
        raw[regime] = recs
        rows += summarize(args.model, regime, recs, saved)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    print(f"ZeRO-3, 2 ranks, gloo, fp32; bytes per rank per optimizer step (step {args.steps} of {args.steps}); "
          f"row-sparse saving from the shapes: {mb(saved)}")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(str(row[c]) if c in ("model", "regime", "method") else mb(row[c])
                                for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
