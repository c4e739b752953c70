"""The optimizer and scheduler sections of an HF/axolotl-style DeepSpeed config, read into
the flags the trainer builds its own torch AdamW + LambdaLR from.

Why not let DeepSpeed build them: its Adam is a fused op compiled on first use (a C++/CUDA
JIT build the CPU accelerator is best kept away from; a torch optimizer avoids it), and one
optimizer path for every config keeps checkpoints and the lr schedule the same whatever
file was carried.

The rules follow transformers' ``HfTrainerDeepSpeedConfig`` (``fill_match``): an
``"auto"`` value is filled from the flag (or the flag's default); a concrete value is
honoured where the trainer builds the same thing, and refused, with the key named, where
it would not be honoured or where it contradicts a flag given on the command line (HF
compares with every TrainingArguments value; here only a flag the user typed counts,
the defaults give way to the file). docs/design.md §9 lists them.
"""
from __future__ import annotations

import argparse
from numbers import Real
from typing import Any

from .errors import UsageError

AUTO = "auto"
# The flags' defaults (cli.py leaves them None so that a flag the user typed can be told apart).
DEFAULT_LR = 2e-4
DEFAULT_WEIGHT_DECAY = 0.0
DEFAULT_SCHEDULE = "cosine"
DEFAULT_WARMUP = 0
DEFAULT_MAX_GRAD_NORM = 1.0
# torch.optim.AdamW's defaults, which are also TrainingArguments' adam_beta1/2 and adam_epsilon.
DEFAULT_BETAS = (0.9, 0.999)
DEFAULT_EPS = 1e-8

OPTIMIZERS = ("adam", "adamw")  # DeepSpeed lower-cases optimizer.type; Adam is AdamW there (adam_w_mode)
OPTIMIZER_PARAMS = ("lr", "betas", "eps", "weight_decay", "torch_adam", "adam_w_mode", "bias_correction")
# DeepSpeed scheduler -> the trainer's --lr-schedule after the warm-up (WarmupLR holds the peak lr).
SCHEDULES = {"warmuplr": "constant", "warmupdecaylr": "linear", "warmupcosinelr": "cosine"}
SCHEDULE_NAMES = {"warmuplr": "WarmupLR", "warmupdecaylr": "WarmupDecayLR", "warmupcosinelr": "WarmupCosineLR"}
SCHEDULER_PARAMS = {
    "warmuplr": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"),
    "warmupdecaylr": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "total_num_steps"),
    "warmupcosinelr": ("warmup_min_ratio", "cos_min_ratio", "warmup_num_steps", "warmup_type", "total_num_steps"),
}
# Ends of the ramp the trainer does not move: its warm-up starts at lr/(warmup+1), its decays end at 0.
ZERO_ONLY = ("warmup_min_lr", "warmup_min_ratio", "cos_min_ratio")


class _Resolver:
    """One config's sections: each setting from its flag and the file's keys, with the note."""

    def __init__(self, where: str):
        self.where = where
        self.filled: list[str] = []  # "key=value (source)" for every "auto" the trainer filled

    def fail(self, message: str) -> None:
        raise UsageError(f"{self.where}: {message}")

    def agree(self, keys: list[tuple[str, Any]], default: Any, flag: str | None = None, given: Any = None,
              check=None, note: bool = True) -> Any:
        """The one value of a setting named by the config ``keys`` ((dotted key, value) pairs;
        None = absent, "auto" = fill) and by ``flag`` (``given``: its value, None if not typed):
        the concrete values must agree with each other and with the flag; none -> ``default``."""
        concrete = [(key, value) for key, value in keys if value is not None and value != AUTO]
        for key, value in concrete:
            if check is not None:
                check(key, value)
        value = given if given is not None else (concrete[0][1] if concrete else default)
        for key, other in concrete:
            if other != value:
                source = f"{flag} {given}" if given is not None else f"{concrete[0][0]} = {value}"
                self.fail(f"{key} = {other} but {source}; set it to \"auto\" or drop one of them")
        source = flag if given is not None else (concrete[0][0] if concrete else "default")
        for key, raw in keys:
            if raw == AUTO and note:
                self.filled.append(f"{key}={_show(value)} ({source})")
        return value

    # ---- value checks: (key, value) -> raises UsageError naming the key -------------------------
    def positive(self, key: str, value: Any) -> None:
        if not _is_real(value) or value <= 0:
            self.fail(f"{key} must be a positive number or \"auto\", got {value!r}")

    def non_negative(self, key: str, value: Any) -> None:
        if not _is_real(value) or value < 0:
            self.fail(f"{key} must be a non-negative number or \"auto\", got {value!r}")

    def steps(self, key: str, value: Any, least: int = 0) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            kind = "a positive" if least else "a non-negative"
            self.fail(f"{key} must be {kind} integer or \"auto\", got {value!r}")

    def betas(self, key: str, value: Any) -> None:
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(_is_real(b) and 0 <= b < 1 for b in value)):
            self.fail(f"{key} must be two numbers in [0, 1) like [0.9, 0.999] or \"auto\", got {value!r}")


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def _section(r: _Resolver, cfg: dict[str, Any], name: str) -> tuple[str | None, dict[str, Any]]:
    """(lower-cased type, params) of ``cfg[name]``; (None, {}) when the section is absent."""
    section = cfg.pop(name, None)
    if section is None:
        return None, {}
    if not isinstance(section, dict) or not isinstance(section.get("type"), str):
        r.fail(f"{name} must be an object with a \"type\" (e.g. {{\"type\": \"AdamW\", \"params\": {{...}}}})")
    unknown = sorted(k for k in section if k not in ("type", "params") and not k.startswith("_"))
    if unknown:
        r.fail(f"{name} key(s) {unknown} are not read; a section holds only \"type\" and \"params\"")
    params = section.get("params", {})
    if not isinstance(params, dict):
        r.fail(f"{name}.params must be an object")
    return section["type"].lower(), params


def _optimizer(r: _Resolver, kind: str | None, params: dict[str, Any]) -> None:
    if kind is None:
        return
    if kind not in OPTIMIZERS:
        r.fail(f"optimizer.type = {kind!r}: the trainer builds torch AdamW itself; set \"type\": \"AdamW\" "
               f"(or \"Adam\") or remove the optimizer section")
    unknown = sorted(k for k in params if k not in OPTIMIZER_PARAMS)
    if unknown:
        r.fail(f"optimizer.params key(s) {unknown} are not honoured: the trainer's torch AdamW takes "
               f"{list(OPTIMIZER_PARAMS[:4])}; remove them")
    for key in ("adam_w_mode", "bias_correction"):  # the only settings torch AdamW has
        if params.get(key, True) not in (True, AUTO):
            r.fail(f"optimizer.params.{key} = {params[key]!r}: the trainer builds torch AdamW (decoupled "
                   f"weight decay, bias correction); remove it")
    if not isinstance(params.get("torch_adam", False), bool) and params.get("torch_adam") != AUTO:
        r.fail(f"optimizer.params.torch_adam must be true or false, got {params['torch_adam']!r}")


def _scheduler(r: _Resolver, kind: str | None, params: dict[str, Any]) -> str | None:
    """The --lr-schedule the section names (None: no section); checks its params."""
    if kind is None:
        return None
    if kind not in SCHEDULES:
        names = ", ".join(f"{SCHEDULE_NAMES[k]} ({v})" for k, v in SCHEDULES.items())
        r.fail(f"scheduler.type = {kind!r}: the trainer's schedules are {names}; use one of them or "
               f"remove the scheduler section (--lr-schedule)")
    unknown = sorted(k for k in params if k not in SCHEDULER_PARAMS[kind])
    if unknown:
        r.fail(f"scheduler.params key(s) {unknown} are not read for {SCHEDULE_NAMES[kind]}; "
               f"it takes {list(SCHEDULER_PARAMS[kind])}")
    for key in ZERO_ONLY:
        if params.get(key, 0) not in (0, AUTO):
            r.fail(f"scheduler.params.{key} = {params[key]!r}: the trainer warms up from about 0 and decays "
                   f"to 0; set it to 0 or \"auto\"")
        if params.get(key) == AUTO:
            r.filled.append(f"scheduler.params.{key}=0")
    if params.get("warmup_type", "linear") not in ("linear", AUTO):
        r.fail(f"scheduler.params.warmup_type = {params['warmup_type']!r}: the trainer warms up linearly; "
               f"set it to \"linear\" or remove it")
    return SCHEDULES[kind]


def resolve_optim_sections(cfg: dict[str, Any], args: argparse.Namespace,
                           where: str) -> tuple[list[str], str | None]:
    """Remove ``optimizer``/``scheduler`` from ``cfg`` (the trainer builds both) and settle
    args.lr, weight_decay, adam_betas, adam_eps, lr_schedule, warmup, max_grad_norm and
    gradient_clipping from them and the flags (a concrete total_num_steps becomes
    --max-steps when no run length was given). Returns (what each "auto" was filled with,
    what the trainer builds when the file had either section)."""
    r = _Resolver(where)
    opt_kind, opt = _section(r, cfg, "optimizer")
    sched_kind, sched = _section(r, cfg, "scheduler")
    _optimizer(r, opt_kind, opt)
    schedule = _scheduler(r, sched_kind, sched)

    args.lr = r.agree([("optimizer.params.lr", opt.get("lr")),
                       ("scheduler.params.warmup_max_lr", sched.get("warmup_max_lr"))],
                      DEFAULT_LR, "--lr", args.lr, r.positive)
    args.weight_decay = r.agree([("optimizer.params.weight_decay", opt.get("weight_decay"))],
                                DEFAULT_WEIGHT_DECAY, "--weight-decay", args.weight_decay, r.non_negative)
    args.adam_betas = tuple(r.agree([("optimizer.params.betas", opt.get("betas"))], DEFAULT_BETAS, check=r.betas))
    args.adam_eps = r.agree([("optimizer.params.eps", opt.get("eps"))], DEFAULT_EPS, check=r.positive)
    if schedule and args.lr_schedule is not None and args.lr_schedule != schedule:
        r.fail(f"scheduler.type = {SCHEDULE_NAMES[sched_kind]} (the {schedule} schedule) but --lr-schedule "
               f"{args.lr_schedule}; drop one of them")
    args.lr_schedule = r.agree([("scheduler.type", schedule)] if schedule else [], DEFAULT_SCHEDULE,
                               "--lr-schedule", args.lr_schedule)
    args.warmup = r.agree([("scheduler.params.warmup_num_steps", sched.get("warmup_num_steps"))],
                          DEFAULT_WARMUP, "--warmup", args.warmup, r.steps)
    total = sched.get("total_num_steps")
    if total == AUTO:
        steps = args.max_steps if args.max_steps is not None else "the run's steps"
        r.filled.append(f"scheduler.params.total_num_steps={steps} (--max-steps/--epochs)")
    elif total is not None:
        r.steps("scheduler.params.total_num_steps", total, least=1)
        if args.epochs is not None:
            r.fail(f"scheduler.params.total_num_steps = {total} but --epochs {args.epochs:g} (the step count is "
                   f"known only once the data is read); set it to \"auto\" or give --max-steps {total}")
        args.max_steps = r.agree([("scheduler.params.total_num_steps", total)], None, "--max-steps", args.max_steps)
    # "auto" clipping is what every shipped config holds (README): filled without a note.
    args.max_grad_norm = r.agree([("gradient_clipping", cfg.get("gradient_clipping"))], DEFAULT_MAX_GRAD_NORM,
                                 "--max-grad-norm", args.max_grad_norm, r.non_negative, note=False)
    cfg["gradient_clipping"] = args.max_grad_norm
    built = None
    if opt_kind or sched_kind:
        built = (f"the trainer builds torch AdamW(lr={args.lr:g}, betas={list(args.adam_betas)}, "
                 f"eps={args.adam_eps:g}, weight_decay={args.weight_decay:g}) and the {args.lr_schedule} lr "
                 f"schedule (warm-up {args.warmup}) from these; the sections are not passed to DeepSpeed")
    return r.filled, built
