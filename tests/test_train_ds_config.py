"""HF/axolotl-style DeepSpeed configs (optimizer / scheduler sections, fp16 and ZeRO buckets
holding "auto"): filled from the flags with one note, concrete values honoured by the
optimizer the trainer builds, the rest refused with one line naming the key
(celora_dist/train/ds_sections.py, docs/design.md §9)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from celora_dist.train.cli import build_parser
from celora_dist.train.engine import build_optimizer, resolve_ds_config
from celora_dist.train.errors import UsageError, exit_report

from .train_utils import REPO, read_metrics, run_train, show

HF_CONFIG = REPO / "ds_configs" / "hf_zero2_auto.json"


@pytest.fixture(autouse=True)
def rank0(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)  # the note is printed by rank 0 only


def _resolve(tmp_path, cfg: dict | None, *argv: str, world: int = 1):
    """(resolved config, args) for ``cfg`` (None: the shipped HF-style file) and the flags."""
    path = HF_CONFIG
    if cfg is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(cfg))
    args = build_parser().parse_args(list(argv))
    return resolve_ds_config(str(path), args, world), args


def _reference_factor(schedule: str, warmup: int, total: int, step: int) -> float:
    """The lr multiplier written out from the README's description of --lr-schedule/--warmup."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[schedule]


def _built(args, total: int):
    """The param group of the optimizer the trainer builds, and its lr over ``total`` steps."""
    optimizer, scheduler = build_optimizer(torch.nn.Linear(3, 2).parameters(), args, total)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return optimizer.param_groups[0], lrs


def _note(capsys) -> str:
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_auto_sections_filled_from_flags(tmp_path, capsys):
    out, args = _resolve(tmp_path, None, "--lr", "3e-3", "--weight-decay", "0.01", "--warmup", "2",
                         "--max-steps", "6")
    assert "optimizer" not in out and "scheduler" not in out  # the trainer builds both
    assert out["fp16"]["enabled"] is False and out["bf16"]["enabled"] is False and args.dtype == "fp32"
    assert "reduce_bucket_size" not in out["zero_optimization"]  # "auto" -> DeepSpeed's default
    assert out["gradient_clipping"] == 1.0 and out["train_micro_batch_size_per_gpu"] == 4
    assert '"auto"' not in json.dumps({k: v for k, v in out.items() if not k.startswith("_")})
    note = _note(capsys)
    for filled in ("optimizer.params.lr=0.003 (--lr)", "scheduler.params.warmup_max_lr=0.003 (--lr)",
                   "optimizer.params.weight_decay=0.01 (--weight-decay)", "optimizer.params.betas=[0.9, 0.999] (default)",
                   "optimizer.params.eps=1e-08 (default)", "scheduler.params.warmup_num_steps=2 (--warmup)",
                   "scheduler.params.total_num_steps=6", "scheduler.params.warmup_min_lr=0",
                   "fp16.enabled=false (--dtype fp32)", "zero_optimization.reduce_bucket_size=DeepSpeed's default",
                   "linear lr schedule"):  # WarmupDecayLR
        assert filled in note, filled
    group, lrs = _built(args, 6)
    assert group["initial_lr"] == 3e-3 and group["weight_decay"] == 0.01
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    assert lrs == pytest.approx([3e-3 * _reference_factor("linear", 2, 6, s) for s in range(6)], rel=1e-12)


def test_auto_sections_without_flags_take_the_defaults(tmp_path, capsys):
    out, args = _resolve(tmp_path, None, "--dtype", "bf16")
    assert (args.lr, args.weight_decay, args.warmup, args.lr_schedule, args.max_steps) == (2e-4, 0.0, 0, "linear", None)
    assert out["bf16"]["enabled"] is True and out["fp16"]["enabled"] is False
    note = _note(capsys)
    assert "optimizer.params.lr=0.0002 (default)" in note and "total_num_steps=the run's steps" in note


def test_concrete_values_honoured(tmp_path, capsys):
    cfg = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.8, 0.95], "eps": 1e-6,
                                                     "weight_decay": 0.05, "torch_adam": True}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3,
                                                        "warmup_num_steps": 3, "warmup_type": "linear"}},
           "gradient_clipping": 0.5, "zero_optimization": {"stage": 1}}
    out, args = _resolve(tmp_path, cfg, "--max-steps", "8")
    assert (args.lr, args.warmup, args.lr_schedule, args.max_grad_norm) == (1e-3, 3, "constant", 0.5)
    assert out["gradient_clipping"] == 0.5 and "optimizer" not in out
    note = _note(capsys)
    assert '"auto" filled' not in note and "AdamW(lr=0.001, betas=[0.8, 0.95], eps=1e-06, weight_decay=0.05)" in note
    group, lrs = _built(args, 8)
    assert group["initial_lr"] == 1e-3 and group["betas"] == (0.8, 0.95)
    assert group["eps"] == 1e-6 and group["weight_decay"] == 0.05
    assert lrs == pytest.approx([1e-3 * _reference_factor("constant", 3, 8, s) for s in range(8)], rel=1e-12)
    # The same values typed as flags agree with the file.
    _, again = _resolve(tmp_path, cfg, "--lr", "1e-3", "--warmup", "3", "--lr-schedule", "constant",
                        "--max-grad-norm", "0.5")
    assert (again.lr, again.warmup, again.lr_schedule, again.max_grad_norm) == (1e-3, 3, "constant", 0.5)


def test_concrete_total_num_steps_and_cosine(tmp_path, capsys):
    """WarmupCosineLR -> cosine; a concrete total_num_steps is the run length when none is given,
    and must equal --max-steps when one is. DeepSpeed's lower-case type names are read too."""
    cfg = {"optimizer": {"type": "adam", "params": {"lr": "auto"}},
           "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 12, "warmup_num_steps": 2,
                                                              "cos_min_ratio": 0, "warmup_min_ratio": "auto"}}}
    _, args = _resolve(tmp_path, cfg, "--lr", "5e-4")
    assert (args.max_steps, args.lr_schedule, args.warmup, args.lr) == (12, "cosine", 2, 5e-4)
    _, lrs = _built(args, args.max_steps)
    assert lrs == pytest.approx([5e-4 * _reference_factor("cosine", 2, 12, s) for s in range(12)], rel=1e-12)
    _, same = _resolve(tmp_path, cfg, "--max-steps", "12")
    assert same.max_steps == 12
    with pytest.raises(UsageError, match=r"scheduler\.params\.total_num_steps = 12 but --max-steps 10"):
        _resolve(tmp_path, cfg, "--max-steps", "10")


def test_axolotl_zero3_buckets_left_to_deepspeed(tmp_path, capsys):
    """axolotl's ZeRO-3 file (aliases of the keys HF sizes from the model): the "auto" buckets are
    DeepSpeed's defaults, said in the note; DeepSpeed's own config parser reads the result."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    cfg = {"zero_optimization": {"stage": 3, "overlap_comm": True, "sub_group_size": 0, "reduce_bucket_size": "auto",
                                 "prefetch_bucket_size": "auto", "param_persistence_threshold": "auto",
                                 "offload_param": {"device": "auto"}, "gather_16bit_weights_on_model_save": True},
           "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto", "loss_scale": 0}, "gradient_accumulation_steps": "auto",
           "gradient_clipping": "auto", "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}
    out, _ = _resolve(tmp_path, cfg, "--micro-batch", "2")
    assert sorted(out["zero_optimization"]) == ["gather_16bit_weights_on_model_save", "offload_param", "overlap_comm",
                                                "stage", "sub_group_size"]
    note = _note(capsys)
    for key in ("reduce_bucket_size", "prefetch_bucket_size", "param_persistence_threshold", "offload_param.device"):
        assert f"zero_optimization.{key}=DeepSpeed's default" in note, key
    parsed = DeepSpeedConfig(out)
    default = DeepSpeedZeroConfig(stage=3)
    assert parsed.zero_optimization_stage == 3 and parsed.train_micro_batch_size_per_gpu == 2
    assert parsed.zero_config.reduce_bucket_size == default.reduce_bucket_size
    assert parsed.zero_config.prefetch_bucket_size == default.prefetch_bucket_size


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "ds_configs").glob("*.json")
                                        if p.name != HF_CONFIG.name))
def test_shipped_configs_keep_their_behaviour(tmp_path, capsys, name):
    """The other shipped configs have no sections: no note, the flags' defaults as before."""
    args = build_parser().parse_args([])
    out = resolve_ds_config(str(REPO / "ds_configs" / name), args, 2)
    assert "note:" not in capsys.readouterr().out
    assert (args.lr, args.weight_decay, args.warmup, args.lr_schedule) == (2e-4, 0.0, 0, "cosine")
    assert (args.adam_betas, args.adam_eps, args.max_grad_norm, out["gradient_clipping"]) == ((0.9, 0.999), 1e-8, 1.0, 1.0)


def _adamw(**params):
    return {"optimizer": {"type": "AdamW", "params": params}}


def _sched(kind: str, **params):
    return {"scheduler": {"type": kind, "params": params}}


REFUSED = [  # (config, flags, the message: names the key and says what to do)
    ({"optimizer": {"type": "Lamb", "params": {"lr": "auto"}}}, [],
     r"optimizer\.type = 'lamb': the trainer builds torch AdamW itself; set \"type\": \"AdamW\""),
    (_adamw(lr=1e-4), ["--lr", "3e-3"], r"optimizer\.params\.lr = 0\.0001 but --lr 0\.003; set it to \"auto\""),
    ({**_adamw(lr=1e-4), **_sched("WarmupLR", warmup_max_lr=2e-4)}, [],
     r"scheduler\.params\.warmup_max_lr = 0\.0002 but optimizer\.params\.lr = 0\.0001"),
    (_adamw(weight_decay=0.1), ["--weight-decay", "0"], r"optimizer\.params\.weight_decay = 0\.1 but --weight-decay 0"),
    (_adamw(amsgrad=True), [], r"optimizer\.params key\(s\) \['amsgrad'\] are not honoured"),
    (_adamw(adam_w_mode=False), [], r"optimizer\.params\.adam_w_mode = False: the trainer builds torch AdamW"),
    (_adamw(betas=[0.9]), [], r"optimizer\.params\.betas must be two numbers in \[0, 1\)"),
    (_adamw(lr=-1), [], r"optimizer\.params\.lr must be a positive number"),
    (_sched("OneCycle", cycle_max_lr=1e-3), [], r"scheduler\.type = 'onecycle': the trainer's schedules are WarmupLR"),
    (_sched("WarmupDecayLR", total_num_steps="auto"), ["--lr-schedule", "cosine"],
     r"scheduler\.type = WarmupDecayLR \(the linear schedule\) but --lr-schedule cosine"),
    (_sched("WarmupLR", warmup_type="log"), [], r"scheduler\.params\.warmup_type = 'log': the trainer warms up linearly"),
    (_sched("WarmupLR", warmup_min_lr=1e-6), [], r"scheduler\.params\.warmup_min_lr = 1e-06: .*set it to 0 or \"auto\""),
    (_sched("WarmupCosineLR", cos_min_ratio=1e-4), [], r"scheduler\.params\.cos_min_ratio = 0\.0001"),
    (_sched("WarmupLR", total_num_steps=10), [], r"scheduler\.params key\(s\) \['total_num_steps'\] are not read for WarmupLR"),
    (_sched("WarmupDecayLR", total_num_steps=10), ["--epochs", "2"],
     r"scheduler\.params\.total_num_steps = 10 but --epochs 2 .*give --max-steps 10"),
    (_sched("WarmupLR", warmup_num_steps=5), ["--warmup", "3"], r"scheduler\.params\.warmup_num_steps = 5 but --warmup 3"),
    ({"gradient_clipping": 0.5}, ["--max-grad-norm", "1"], r"gradient_clipping = 0\.5 but --max-grad-norm 1\.0"),
    ({"fp16": {"enabled": True}}, [], r"fp16 is not supported; use --dtype bf16"),
    ({"scheduler": {"params": {}}}, [], r"scheduler must be an object with a \"type\""),
]


@pytest.mark.parametrize("cfg,argv,pattern", REFUSED, ids=[p[:40] for _, _, p in REFUSED])
def test_refused_with_one_line_naming_the_key(tmp_path, capsys, cfg, argv, pattern):
    with pytest.raises(UsageError, match=pattern) as info:
        _resolve(tmp_path, cfg, *argv)
    line, status = exit_report(info.value)
    assert status == 2 and line.startswith("error: --deepspeed_config ")
    assert "\n" not in line
    assert "note:" not in capsys.readouterr().out  # no note for a refused config


def test_hf_config_trains_end_to_end(assets, tmp_path):
    """launch/train.py with the shipped HF-style file: one note, the lr of each step from the
    flags' schedule (WarmupDecayLR = linear), and the AdamW DeepSpeed checkpointed has the
    filled values."""
    out = tmp_path / "run"
    proc = run_train(["--model", str(assets["model"]), "--data", str(assets["mc"]), "--r", "4", "--alpha", "8",
                      "--r0", "4", "--seq-len", "64", "--mc-format", "letter", "--lr", "3e-3", "--warmup", "2",
                      "--weight-decay", "0.01", "--max-steps", "4", "--no-final-eval", "--no-factor-cache",
                      "--deepspeed_config", str(HF_CONFIG), "--output-dir", str(out)], timeout=180)
    assert proc.returncode == 0, show(proc)
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note: --deepspeed_config")]
    assert len(notes) == 1 and "optimizer.params.lr=0.003 (--lr)" in notes[0], show(proc)
    lrs = [r["lr"] for r in read_metrics(out) if "eval" not in r]
    assert lrs == pytest.approx([3e-3 * _reference_factor("linear", 2, 4, s) for s in range(4)], rel=1e-9)
    state = torch.load(out / "checkpoints" / "step000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       weights_only=False)
    group = state["optimizer_state_dict"]["base_optimizer_state"]["param_groups"][0]
    assert group["initial_lr"] == 3e-3 and group["weight_decay"] == 0.01
    assert tuple(group["betas"]) == (0.9, 0.999) and group["eps"] == 1e-8
    assert "optimizer" not in state["ds_config"] and state["ds_config"]["fp16"]["enabled"] is False
