"""Fine-tune a causal LM with CE-LoRA through DeepSpeed.

Single process (debug mode; CPU or one GPU):

    python launch/train.py                                   # embedded default: SmolLM2-135M on PIQA
    python launch/train.py --model PATH --data train.jsonl --max-steps 200

Several ranks (DeepSpeed's launcher; on a machine without GPUs add DS_ACCELERATOR=cpu):

    deepspeed --num_gpus 2 launch/train.py
    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/zero2.json \\
        --model PATH --data commonsense_170k.json --keep v_proj=0.55,o_proj=0.55 --output-dir runs/x
    deepspeed --num_gpus 4 launch/train.py --deepspeed_config ds_configs/tp2_zero1.json ...   # TP 2 x DP 2

Tensor parallelism: the TP size is the config's tensor_parallel.autotp_size (or --tp N);
ranks form a TP x DP grid, ZeRO stages 0-2 partition over the DP group (TP + ZeRO-3 is refused).

Outputs in --output-dir: metrics.jsonl, checkpoints/ (resume with --resume DIR),
adapter/ (PEFT format: peft.PeftModel.from_pretrained(base, "adapter")), summary.json.
The script reads top to bottom; the pieces live in celora_dist/train/.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from celora_dist.train.cli import UsageError, parse_args

EMBEDDED_MAX_STEPS = 30
EMBEDDED_EVAL_SAMPLES = 100


def main(argv: list[str] | None = None) -> dict:
    # ---- 1. flags, DeepSpeed config, data files: every check before any real work ----------
    args = parse_args(argv)
    from celora_dist.train import data as D
    from celora_dist.train import engine as E
    from celora_dist.train import parallel as P

    E.setup_environment()
    world = int(os.environ["WORLD_SIZE"])
    ds_config = E.resolve_ds_config(args.deepspeed_config, args, world)  # also the TP size: args.tp
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    tp = args.tp
    is_main = int(os.environ.get("RANK", "0")) == 0
    run_info = {"world_size": world, "zero_stage": zero_stage, "dtype": args.dtype, "method": args.method,
                "tp_size": tp}
    if args.resume:
        from celora_dist.train.checkpoint import check_compatible

        check_compatible(args.resume_dir, args.resume_tag, run_info)
    if args.embedded:
        from celora_dist.train import embedded

        model_dir = embedded.ensure_model(verbose=is_main)
        train_records, eval_records, task = embedded.task_records(args.mc_format)
        if args.max_steps is None and args.epochs is None:
            args.max_steps = EMBEDDED_MAX_STEPS
        if args.eval_samples is None:
            args.eval_samples = EMBEDDED_EVAL_SAMPLES
    else:
        model_dir = args.model
        train_records = D.read_records(args.data, args.mc_format)
        if args.eval_data:
            eval_records = D.read_records(args.eval_data, args.mc_format)
        else:
            train_records, eval_records = D.split_records(train_records, args.eval_fraction)
        task = f"{Path(args.data).name}: {len(train_records)} train / {len(eval_records)} held out"
    if args.eval_samples is not None:
        eval_records = eval_records[: args.eval_samples]
    check_targets(model_dir, args.celora)
    P.check_tp_model(model_dir, tp)

    # ---- 2. processes, model, CE-LoRA surgery ----------------------------------------------
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import celora_dist
    from celora_dist.train import checkpoint as C
    from celora_dist.train.evaluate import evaluate
    from celora_dist.train.metrics import Metrics, celora_record, peak_memory_mb

    E.init_distributed()
    rank = dist.get_rank()
    tp_group, dp_group = P.process_groups(tp)  # DeepSpeed's TP x DP grid (tp_group None without TP)
    dp_rank, dp_world = dist.get_rank(dp_group), dist.get_world_size(dp_group)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(args.seed)  # identical LoRA init on every rank
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.config.use_cache = False
    celora_dist.inject_celora(model, args.celora, verbose=is_main)
    P.shard_model(model, tp_group)  # TP: q/k/v/gate/up column-parallel, o/down row-parallel
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ---- 3. data: tokenized, split over DP ranks (identical within a TP group) ---------------
    train_ds = D.tokenize(train_records, tokenizer, args.seq_len)
    batches = D.StepBatches(train_ds, args.micro_batch, args.grad_accum, dp_rank, dp_world, args.seed, pad_id)
    total_steps = args.max_steps or max(1, round((args.epochs or 1) * batches.steps_per_epoch))

    # ---- 4. DeepSpeed engine (AdamW on the LoRA parameters), resume ------------------------
    engine, _, scheduler = E.build_engine(model, ds_config, args, total_steps)
    device = engine.device
    output_dir = Path(args.output_dir)
    ckpt_dir = output_dir / "checkpoints"
    step = 0
    if args.resume:
        client = C.load(engine, args.resume_dir, args.resume_tag)
        E.sync_lr_after_resume(scheduler)
        step = client["step"]
        batches.load_state(client["data"])
    else:
        torch.manual_seed(args.seed + dp_rank)  # per-replica stream for dropout (a TP group shares it)
    metrics = Metrics(output_dir, total_steps, step, is_main, resumed=bool(args.resume))
    layout = f"ZeRO-{zero_stage} x {world} rank(s)" + (f" (TP {tp} x DP {dp_world})" if tp > 1 else "")
    metrics.message(
        f"{'CE-LoRA' if args.method == 'celora' else 'LoRA'} | {Path(model_dir).name} | {task} | "
        f"{layout} | micro-batch {args.micro_batch} x grad-accum {args.grad_accum} "
        f"| {total_steps} steps ({batches.steps_per_epoch}/epoch) | {args.dtype}"
        + (f" | resumed at step {step}" if args.resume else ""))

    def run_eval(label: str) -> dict:
        t = time.perf_counter()
        result = evaluate(engine.module, tokenizer, eval_records, args.seq_len, device, group=dp_group)
        result["eval_time_s"] = round(time.perf_counter() - t, 2)
        metrics.write({"step": step, "eval": label, **result})
        acc = f", accuracy {result['accuracy']:.4f}" if "accuracy" in result else ""
        metrics.message(f"[{label}] held-out loss {result['eval_loss']:.4f}{acc} "
                        f"on {len(eval_records)} examples ({result['eval_time_s']} s)")
        return result

    zero_shot = run_eval("zero-shot") if args.zero_shot and not args.resume and eval_records else None

    # ---- 5. the loop: grad-accum micro-steps, engine.step(), CE-LoRA schedule --------------
    engine.train()
    t_start = time.perf_counter()
    losses = []
    step_batches = iter(batches)
    while step < total_steps:
        group = next(step_batches)  # grad-accum micro-batches of this optimizer step
        t0 = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        loss_sum, tokens = 0.0, 0
        for micro in group:
            micro = {k: v.to(device) for k, v in micro.items()}
            loss = engine(**micro).loss
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            if boundary:  # finish refreshes, sync scores over the DP group, advance counters
                celora_dist.on_optimizer_step(engine.module, group=dp_group)
            loss_sum += float(loss.detach())
            tokens += int(micro["attention_mask"].sum())
        stats = torch.tensor([loss_sum / len(group), float(tokens)], dtype=torch.float64)
        dist.all_reduce(stats, group=dp_group)  # the ranks of a TP group share one batch
        step_time = time.perf_counter() - t0
        record = {"step": step, "loss": stats[0].item() / dp_world, "lr": lr,
                  "grad_norm": _float(engine.get_global_grad_norm()), "tokens": int(stats[1].item()),
                  "tokens_per_s": stats[1].item() / step_time, "step_time_s": step_time,
                  "peak_mem_mb": peak_memory_mb()}
        celora = celora_record(engine.module, step)  # dX errors, head error, adaptive k on refresh steps
        record.update(celora)
        losses.append(record["loss"])
        step += 1
        metrics.step(record, write=bool(celora) or step % args.log_every == 0 or step == total_steps)
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            C.save(engine, ckpt_dir, step, {"step": step, "data": batches.state()}, run_info)
        if args.eval_every and step % args.eval_every == 0 and step < total_steps and eval_records:
            run_eval(f"step {step}")
    train_time = time.perf_counter() - t_start
    metrics.close()

    # ---- 6. final checkpoint, PEFT adapter, held-out evaluation, summary ------------------
    C.save(engine, ckpt_dir, step, {"step": step, "data": batches.state()}, run_info)
    P.export_adapter(engine.module, output_dir / "adapter", str(model_dir), tp)  # TP: gathered to full tensors
    if args.dump_celora_state:
        dump = output_dir / "celora_state"
        dump.mkdir(parents=True, exist_ok=True)
        torch.save(celora_dist.celora_state_dict(engine.module), dump / f"rank{rank}.pt")
    final = run_eval("final") if eval_records and not args.no_final_eval else None
    summary = {
        "method": args.method, "zero_stage": zero_stage, "world_size": world, "tp_size": tp, "steps": step,
        "train_time_s": round(train_time, 2),
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "zero_shot_accuracy": (zero_shot or {}).get("accuracy"),
        "accuracy": (final or {}).get("accuracy"), "eval_loss": (final or {}).get("eval_loss"),
        "majority_rate": (final or zero_shot or {}).get("majority_rate"),
        "eval_examples": len(eval_records), "adapter": str(output_dir / "adapter"),
    }
    if is_main:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        acc = "" if summary["accuracy"] is None else f" | held-out accuracy {summary['accuracy']:.4f}"
        zs = "" if summary["zero_shot_accuracy"] is None else f" (zero-shot {summary['zero_shot_accuracy']:.4f})"
        print(f"summary: {step} steps in {train_time:.1f} s | loss {summary['first_loss']:.4f} -> "
              f"{summary['last_loss']:.4f}{acc}{zs} | adapter {output_dir / 'adapter'}", flush=True)
    dist.barrier()
    return summary


def check_targets(model_dir, cfg) -> None:
    """Fail before loading weights if a target module name is not in the model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as e:
        raise UsageError(f"--model {model_dir}: cannot read its config: {e}") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = {n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        raise UsageError(f"target module(s) {missing} are not in {model_dir} "
                         f"({type(skeleton).__name__}); its linear modules are {sorted(names)}")


def _float(x):
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
