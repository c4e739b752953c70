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

Outputs in --output-dir: metrics.jsonl, checkpoints/ (resume with --resume DIR, also on another
number of data-parallel ranks with the same micro-batch x grad-accum x ranks),
adapter/ (PEFT format: peft.PeftModel.from_pretrained(base, "adapter")), summary.json.
The script reads top to bottom; the pieces live in celora_dist/train/.
"""
from __future__ import annotations

import sys
import time

import celora_dist
from celora_dist.train import data as D
from celora_dist.train import engine as E
from celora_dist.train import finish as F
from celora_dist.train import model as M
from celora_dist.train import parallel as P
from celora_dist.train import run as R
from celora_dist.train import sequence as S
from celora_dist.train.cli import parse_args
from celora_dist.train.errors import exit_report
from celora_dist.train.metrics import step_record
from celora_dist.train.prepare import prepare


def main(argv: list[str] | None = None) -> dict:
    # ---- 1. set up: every check first, then processes, model + CE-LoRA, data, engine, resume --
    args = parse_args(argv)  # flags, config files, --resume folder
    job = prepare(args)  # DeepSpeed config, TP size, records, target modules: still no real work
    E.init_distributed(args.dist_timeout)  # a rank that stops responding fails the job, not hangs it
    tp_group, dp_group = P.process_groups(job.tp)  # DeepSpeed's TP x DP grid (tp_group None without TP)
    dp_group, sp_group = S.start(args, job, dp_group)  # --sequence-parallel: Ulysses; DP group without SP peers
    tokenizer, model = M.load(job.model_dir, args.dtype, args.seed, args.chat_template, args.quantize,
                              S.attn_implementation(job.sp))  # seeded: same LoRA init; sdpa under SP
    celora_dist.inject_celora(model, args.celora, verbose=job.is_main, factor_cache=args.factor_cache)  # SVDs split over ranks
    M.chunk_loss(model, args.loss_chunk, job.is_main)  # the LM-head loss a chunk at a time: no (T, V) logits
    P.shard_model(model, tp_group)  # TP: q/k/v/gate/up column-parallel, o/down row-parallel
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batches = D.step_batches(job.train_records, tokenizer, args, dp_group)  # split over DP ranks
    total_steps = args.max_steps or max(1, round((args.epochs or 1) * batches.steps_per_epoch))
    engine, _, scheduler = E.build_engine(model, job.ds_config, args, total_steps)  # AdamW on the LoRA params
    step = R.start(engine, scheduler, batches, args, job, dp_group)  # the checkpoint's step, or 0
    run = R.Run(args, job, engine, tokenizer, batches, dp_group, total_steps, step)  # metrics, evals, saves
    zero_shot = run.evaluate("zero-shot", 0) if args.zero_shot and not args.resume and job.eval_records else None

    # ---- 2. the loop: grad-accum micro-steps, engine.step(), CE-LoRA schedule ----------------
    engine.train()
    t_start = time.perf_counter()
    losses = []
    step_batches = iter(batches)
    while step < total_steps:
        group = next(step_batches)  # grad-accum micro-batches of this optimizer step
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]  # the schedule's lr for this step, as set on the optimizer
        loss_sum, tokens = 0.0, 0
        for micro in group:
            micro = {k: v.to(engine.device) for k, v in micro.items()}
            loss = S.micro_loss(engine, micro, sp_group)  # SP: this rank's shard; value: the full loss
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            if boundary:  # finish refreshes, sync scores over the DP group (SP x DP), advance counters
                celora_dist.on_optimizer_step(engine.module, group=S.score_group(dp_group, sp_group))
            loss_sum += float(loss.detach())
            tokens += D.batch_tokens(micro)
        record = step_record(engine, step, loss_sum / len(group), tokens, lr, t0, dp_group)  # DP-averaged
        losses.append(record["loss"])
        step += 1
        run.after_step(step, record)  # metrics.jsonl, --save-every checkpoint, --eval-every evaluation
    train_time = time.perf_counter() - t_start
    run.close()  # progress bar, signal handlers

    # ---- 3. finish: final checkpoint, PEFT adapter, held-out evaluation, summary ---------------
    run.save(step)
    P.export_adapter(engine.module, run.output_dir / "adapter", str(job.model_dir), job.tp)  # TP: gathered
    if args.dump_celora_state:
        F.dump_celora_state(engine.module, run.output_dir)
    final = run.evaluate("final", step) if job.eval_records and not args.no_final_eval else None
    summary = F.summarize(args, job, step, train_time, losses, zero_shot, final)
    F.report(summary, run.output_dir, train_time, job.is_main)  # summary.json, "summary: ..." line
    return summary


if __name__ == "__main__":
    status = 0
    try:
        main()
    except Exception as e:  # bad input, a non-finite step, SIGTERM, a collective timeout; others re-raised
        message, status = exit_report(e)
        print(message, file=sys.stderr, flush=True)
    finally:
        E.shutdown()  # no process-group threads left to abort the exit
    E.exit_process(status)  # atexit handlers, then no interpreter teardown (a C++ thread could abort it)
