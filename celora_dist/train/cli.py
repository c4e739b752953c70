"""Command-line flags of ``launch/train.py`` and the checks that need no model or data.

Everything here runs before torch.distributed, the model or the data are touched, so
a typo costs seconds, not a launch. Errors are :class:`UsageError` with a message
naming the flag or file at fault.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..chunked_forward import DEFAULT_CHUNK
from ..config import AUTO, RELEASED_KEEP, SVD_METHODS, CELoRAConfig, is_error_budget, is_fraction
from ..presets import PRESETS, preset
from .checkpoint import find_checkpoint
# UsageError is re-exported: ``from celora_dist.train.cli import UsageError`` keeps working.
from .embedded import cache_dir
from .errors import UsageError, load_mapping
from .outputs import check_output_dir
from .quantize import QUANTIZE

METHODS = ("celora", "lora")
LR_SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("fp32", "bf16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Fine-tune a causal LM with CE-LoRA (or LoRA) through DeepSpeed. "
                    "With no --model/--data: SmolLM2-135M-Instruct on PIQA, then held-out accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="HF model folder (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--data", default=None, nargs="+",
                   help="training data, one source or several (concatenated): JSON/JSONL files, parquet files "
                        "or datasets save_to_disk folders, with chat {messages} / ShareGPT {conversations}, "
                        "alpaca {instruction,input,output} or multiple-choice (BoolQ/PIQA/SIQA/OBQA/CSQA "
                        "shapes) rows (default: embedded PIQA)")
    g.add_argument("--chat-template", default=None,
                   help="Jinja chat template file for chat data (default: the tokenizer's own)")
    g.add_argument("--eval-data", default=None,
                   help="held-out file (default: a fixed held-out split of --data)")
    g.add_argument("--eval-fraction", type=float, default=0.1,
                   help="share of --data held out for evaluation when --eval-data is not given")
    g.add_argument("--eval-samples", type=int, default=None, help="evaluate on at most this many held-out examples")
    g.add_argument("--mc-format", choices=("text", "letter"), default="text",
                   help="multiple choice: answer with the option text (scored per option) or its letter")
    g.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="load the frozen base quantized by bitsandbytes: nf4 / fp4 (QLoRA's 4-bit, double "
                        "quantization, --dtype as compute dtype) or int8 (LLM.int8); CE-QLoRA dequantizes only "
                        "the kept rows in backward. ZeRO 0-2, no TP")
    g.add_argument("--seq-len", type=int, default=256, help="max tokens per example (prompt truncated from the left)")
    g.add_argument("--packing", action="store_true",
                   help="padding-free micro-batches: the examples of a micro-batch in one sequence, position ids "
                        "restarting per example, no attention across examples (same loss as padded, no pad compute)")

    g = p.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default="celora",
                   help="celora, or lora = the same code path with every target exact (keep = 1)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="start from a named CE-LoRA config (celora_dist/presets.py): 'released' (the default "
                        "config) or 'fast' (all seven projections adaptive + vocab-sparse head; BENCHMARKS.md); "
                        "--celora-config and the flags below override its fields")
    g.add_argument("--celora-config", default=None, help="YAML/JSON file with CELoRAConfig fields")
    g.add_argument("--r", type=int, default=None, help="trainable LoRA rank")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha")
    g.add_argument("--r0", type=int, default=None, help="rank of the frozen SVD factors B0, A0")
    g.add_argument("--keep", default=None,
                   help="kept fractions per module, e.g. v_proj=0.55,o_proj=0.55 (1 makes a module exact); "
                        "'auto' (every approximate module) or v_proj=auto,...: k chosen on each refresh "
                        "step to meet --error-budget")
    g.add_argument("--error-budget", type=float, default=None,
                   help="target relative dX error per layer for keep 'auto', in [0, 1) (config default 0.3)")
    g.add_argument("--head-keep", type=float, default=None,
                   help="vocab-sparse LM head: fraction of vocabulary rows kept in the head's backward dX, "
                        "in (0, 1] (default: exact head)")
    g.add_argument("--no-head-tail-correction", action="store_true",
                   help="vocab-sparse LM head: drop the tail correction (the dropped rows' weighted mean added "
                        "to dH, labels always kept; docs/design.md §5) -- for ablations")
    g.add_argument("--refresh-every", type=int, default=None, help="optimizer steps between index refreshes")
    g.add_argument("--dense-warmup", type=int, default=None,
                   help="optimizer steps at the start with the exact dX everywhere (layers and vocab-sparse head), "
                        "each a refresh step; docs/design.md §1 (config default 0)")
    g.add_argument("--no-sync-indices", action="store_true", help="each DP rank selects indices from its own G")
    g.add_argument("--factor-cache", default=None,
                   help="folder caching the SVD splits of the frozen weights, keyed by the weights' bytes, "
                        "r0 and dtype (default: $CELORA_CACHE/factors, else ~/.cache/celora_dist/factors)")
    g.add_argument("--no-factor-cache", action="store_true", help="recompute every SVD split, store nothing")
    g.add_argument("--svd", choices=SVD_METHODS, default=None,
                   help="how the start-up SVD split of each approximate W0 is computed: randomized "
                        "(range finder seeded by the weight's bytes) or exact (torch.linalg.svd); "
                        "docs/design.md §1 (config default: randomized)")
    g.add_argument("--svd-oversample", type=int, default=None,
                   help="randomized split: extra test columns beyond r0 (config default 16)")
    g.add_argument("--svd-niter", type=int, default=None,
                   help="randomized split: power iterations (config default 4)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: 1 epoch; 30 for the embedded default)")
    g.add_argument("--epochs", type=float, default=None, help="epochs over --data (alternative to --max-steps)")
    # None = not typed: the DeepSpeed config's optimizer/scheduler values, else the default in the help
    # (a typed flag that contradicts the file is refused; train/ds_sections.py).
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: the DeepSpeed config's optimizer lr, else 2e-4)")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                   help="after the warm-up (default: the DeepSpeed config's scheduler type, else cosine)")
    g.add_argument("--warmup", type=int, default=None,
                   help="linear warm-up steps (default: the DeepSpeed config's warmup_num_steps, else 0)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="AdamW weight decay (default: the DeepSpeed config's optimizer weight_decay, else 0)")
    g.add_argument("--micro-batch", type=int, default=None, help="examples per rank per micro-step (default 4)")
    g.add_argument("--grad-accum", type=int, default=None, help="micro-steps per optimizer step (default 1)")
    g.add_argument("--max-grad-norm", type=float, default=None,
                   help="gradient clipping, 0 = off (default: the DeepSpeed config's gradient_clipping, else 1.0)")
    g.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 if the DeepSpeed config enables it, else fp32")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--loss-chunk", type=int, default=DEFAULT_CHUNK, metavar="TOKENS",
                   help="compute the LM-head loss and its backward TOKENS counted tokens at a time, never holding "
                        "the (tokens x vocab) logits (exactly HF's loss and gradients, vocab-sparse head included; "
                        "models whose head it cannot reproduce keep HF's path, with a note); 0 = HF's full-logits "
                        "path")
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model through DeepSpeed's engine.compile() (default backend: inductor; "
                        "e.g. aot_eager to skip code generation). CE-LoRA layers stay eager at the graph "
                        "boundary of docs/design.md §4; the first step (and the first evaluation) pay the compile")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("run")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON config (default: ds_configs/zero2.json)")
    g.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel size: fills tensor_parallel.autotp_size of the DeepSpeed config "
                        "(ZeRO 0-2 only; default: the config's, else 1)")
    g.add_argument("--sequence-parallel", type=int, default=None, metavar="N",
                   help="Ulysses sequence parallelism (DeepSpeed's): N ranks train each sequence, 1/N of its "
                        "tokens each; fills sequence_parallel_size of the DeepSpeed config (default: the config's, "
                        "else 1). N divides the ranks and --seq-len; no TP, no --packing; sdpa attention")
    g.add_argument("--output-dir", default="runs/celora", help="metrics.jsonl, checkpoints/, adapter/")
    g.add_argument("--resume", default=None, help="checkpoint folder (or an output dir) to continue from")
    g.add_argument("--dist-timeout", type=float, default=600,
                   help="seconds a collective may wait for another rank before the job fails (torch's "
                        "default is 30 minutes); raise it if ranks legitimately drift apart that long")
    g.add_argument("--overwrite-output-dir", action="store_true",
                   help="replace the run already in --output-dir (moved aside at start, deleted once this "
                        "run's first checkpoint exists); without it such a folder is refused")
    g.add_argument("--save-every", type=int, default=0, help="save a checkpoint every N steps (0 = only at the end)")
    g.add_argument("--save-total-limit", type=int, default=0,
                   help="keep only the newest N complete checkpoints (0 = keep all); the one --resume "
                        "would load is never deleted")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0 = only at the end)")
    g.add_argument("--log-every", type=int, default=1, help="write metrics.jsonl every N steps")
    g.add_argument("--report-to", default="none",
                   help="also log through DeepSpeed's monitor: any of tensorboard,csv,wandb (comma-separated; "
                        "files under OUTPUT/logs), with CE-LoRA's dX errors; or none")
    g.add_argument("--zero-shot", action=argparse.BooleanOptionalAction, default=None,
                   help="also evaluate before training (default: on for the embedded default)")
    g.add_argument("--no-final-eval", action="store_true", help="skip the held-out evaluation at the end")
    g.add_argument("--eval-mode", choices=("score", "generate"), default="score",
                   help="score: answer loss + choice log-likelihood accuracy; generate: also greedy generation "
                        "with answer extraction (letters, yes/no, numbers, option words) and exact match")
    g.add_argument("--max-new-tokens", type=int, default=32, help="generation length cap of --eval-mode generate")
    g.add_argument("--dump-celora-state", action="store_true",
                   help="write each rank's selected indices to OUTPUT/celora_state/rank<R>.pt at the end")
    g.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def _parse_keep(text: str) -> dict[str, float | str]:
    keep: dict[str, float | str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--keep: expected MODULE=FRACTION items like v_proj=0.55 (or 'auto'), got {item!r}")
        if value.strip().lower() == AUTO:
            keep[name.strip()] = AUTO
            continue
        try:
            frac = float(value)
        except ValueError:
            raise UsageError(f"--keep {name.strip()}: {value!r} is not a number") from None
        if not is_fraction(frac):
            raise UsageError(f"--keep {name.strip()}={value}: keep must be in (0, 1] (the share of output "
                             f"features kept; 1 = exact)")
        keep[name.strip()] = frac
    if not keep:
        raise UsageError("--keep is empty")
    return keep


def celora_config_from_args(args: argparse.Namespace) -> CELoRAConfig:
    """CELoRAConfig from --preset, then --celora-config, then the CLI overrides, then --method."""
    base = (preset(args.preset) if args.preset else CELoRAConfig()).to_dict()
    if args.celora_config:
        base.update(load_mapping(args.celora_config, "--celora-config"))
    for flag, key in (("r", "r"), ("alpha", "alpha"), ("r0", "r0"), ("refresh_every", "refresh_every"),
                      ("dense_warmup", "dense_warmup"),
                      ("svd", "svd"), ("svd_oversample", "svd_oversample"), ("svd_niter", "svd_niter")):
        if getattr(args, flag) is not None:
            base[key] = getattr(args, flag)
    if args.no_sync_indices:
        base["sync_indices"] = False
    if args.error_budget is not None:
        if not is_error_budget(args.error_budget):
            raise UsageError(f"--error-budget must be in [0, 1) (a relative dX error), got {args.error_budget}")
        base["error_budget"] = args.error_budget
    if args.head_keep is not None:
        if not is_fraction(args.head_keep):
            raise UsageError(f"--head-keep must be in (0, 1] (the share of vocabulary rows kept), "
                             f"got {args.head_keep}")
        base["head_keep"] = args.head_keep
    if args.no_head_tail_correction:
        base["head_tail_correction"] = False
    keep = base.get("keep", {})
    keep = {name: AUTO for name in RELEASED_KEEP} if keep == AUTO else dict(keep)
    exact = list(base.get("exact", []))
    if args.keep and args.keep.strip().lower() == AUTO:  # every approximate module adaptive
        keep = {name: AUTO for name in (keep or RELEASED_KEEP)}
        exact = [name for name in exact if name not in keep]
    elif args.keep:
        for name, frac in _parse_keep(args.keep).items():
            keep.pop(name, None)
            if name in exact:
                exact.remove(name)
            if frac == AUTO:
                keep[name] = AUTO
            elif frac >= 1.0:
                exact.append(name)
            else:
                keep[name] = frac
    if args.method == "lora":  # same layers, every one exact: plain LoRA through the same code
        exact = exact + [n for n in keep if n not in exact]
        keep = {}
    base["keep"], base["exact"] = keep, exact
    try:
        return CELoRAConfig.from_dict(base)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None


def check_compile_backend(backend: str) -> None:
    """--compile BACKEND names a torch.compile backend (UsageError otherwise)."""
    import torch

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise UsageError(f"--compile {backend}: not a torch.compile backend; choose from {', '.join(sorted(known))}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; fills ``args.celora`` (CELoRAConfig) and ``args.embedded``."""
    args = build_parser().parse_args(argv)
    may_be_zero = ("r0", "svd_oversample", "svd_niter", "warmup", "loss_chunk", "dense_warmup")
    for flag in ("micro_batch", "grad_accum", "max_steps", "seq_len", "r", "refresh_every", "tp", "sequence_parallel",
                 *may_be_zero):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag in may_be_zero else 1):
            raise UsageError(f"--{flag.replace('_', '-')} must be {'non-negative' if flag in may_be_zero else 'positive'}, "
                             f"got {value}")
    if args.max_steps is not None and args.epochs is not None:
        raise UsageError("give --max-steps or --epochs, not both")
    if args.epochs is not None and args.epochs <= 0:
        raise UsageError(f"--epochs must be positive, got {args.epochs}")
    if not (0.0 < args.eval_fraction < 1.0):
        raise UsageError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    if args.lr is not None and args.lr <= 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    for flag in ("save_every", "save_total_limit"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be 0 or more, got {getattr(args, flag)}")
    if not args.dist_timeout > 0:
        raise UsageError(f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout}")
    if (args.model is None) != (args.data is None):
        raise UsageError("give both --model and --data, or neither (the embedded default: SmolLM2-135M on PIQA)")
    args.embedded = args.model is None
    if args.model is not None:
        model = Path(args.model)
        if not (model / "config.json").is_file():
            raise UsageError(f"--model {args.model}: not a Hugging Face model folder (no config.json there)"
                             if model.exists() else f"--model {args.model}: no such folder")
    for flag, paths in (("data", args.data or []), ("eval_data", [args.eval_data] if args.eval_data else [])):
        for path in paths:
            if not Path(path).exists():
                raise UsageError(f"--{flag.replace('_', '-')} {path}: no such file or folder")
    if args.compile is not None:
        check_compile_backend(args.compile)
    if args.chat_template is not None and not Path(args.chat_template).is_file():
        raise UsageError(f"--chat-template {args.chat_template}: no such file")
    if args.deepspeed_config is None:
        args.deepspeed_config = str(Path(__file__).resolve().parents[2] / "ds_configs" / "zero2.json")
        if not Path(args.deepspeed_config).is_file():
            raise UsageError("no --deepspeed_config given and ds_configs/zero2.json is not next to the package")
    args.celora = celora_config_from_args(args)
    if args.no_factor_cache:
        args.factor_cache = None
    elif args.factor_cache is None:
        args.factor_cache = str(cache_dir() / "factors")
    if args.zero_shot is None:
        args.zero_shot = args.embedded
    args.resume_dir = args.resume_tag = None
    if args.resume is not None:
        args.resume_dir, args.resume_tag = find_checkpoint(args.resume)
    check_output_dir(args.output_dir, args.resume, args.resume_dir, args.overwrite_output_dir)
    return args
