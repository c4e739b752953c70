"""What happens around the training step: where the run starts, what each step leaves behind.

:func:`start` resumes a checkpoint or seeds a fresh run; :class:`Run` holds what the
loop shares (engine, held-out records, metrics log, checkpoint folder) so that
``launch/train.py`` calls one method per event: a held-out evaluation, the end of an
optimizer step (metrics.jsonl, periodic checkpoint and evaluation), a checkpoint.
"""
from __future__ import annotations

import argparse
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

from . import checkpoint, elastic, evaluate, generation, monitor, outputs
from .engine import sync_lr_after_resume
from .errors import StopRequested, TrainingError
from .metrics import Metrics, backend_summary, has_telemetry
from .parallel import export_adapter
from .prepare import Job


def start(engine, scheduler, batches, args: argparse.Namespace, job: Job, dp_group: Any) -> int:
    """The optimizer step this run starts at.

    Resume: the checkpoint's engine, CE-LoRA schedule, RNG states and data position, with
    the lr this run's schedule gives the saved step (--max-steps may have changed); on
    another DP size (``job.resized_from``) the RNG streams are reseeded instead (elastic.py).
    Fresh: 0, after seeding each DP replica's own dropout stream (a TP group shares one)."""
    import torch
    import torch.distributed as dist

    if args.resume:
        client = checkpoint.load(engine, args.resume_dir, args.resume_tag, job.resized_from,
                                 Path(args.output_dir) / "checkpoints" / elastic.UNIVERSAL)
        sync_lr_after_resume(scheduler)
        batches.load_state(client["data"])
        if job.resized_from is not None:
            elastic.reseed(args.seed, client["step"], dist.get_rank(dp_group))
        return client["step"]
    torch.manual_seed(args.seed + dist.get_rank(dp_group))
    return 0


class Run:
    """The loop's surroundings; creating it opens metrics.jsonl and prints the run's banner."""

    def __init__(self, args: argparse.Namespace, job: Job, engine, tokenizer, batches, dp_group: Any,
                 total_steps: int, step: int):
        import torch.distributed as dist

        self.args, self.job, self.engine, self.tokenizer, self.batches = args, job, engine, tokenizer, batches
        self.dp_group, self.total_steps = dp_group, total_steps
        self.output_dir = Path(args.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.stop = StopSignals()
        self.watchdog = Watchdog(args.dist_timeout, str(self.output_dir))
        # --overwrite-output-dir: the earlier run is moved aside now and deleted after our first checkpoint
        self.previous_run = None
        if job.is_main and args.overwrite_output_dir:
            self.previous_run = outputs.set_aside_previous_run(self.output_dir)
        self.metrics = Metrics(self.output_dir, total_steps, step, job.is_main, resumed=bool(args.resume))
        dp_world = dist.get_world_size(dp_group)
        layout = f"ZeRO-{job.zero_stage} x {job.world} rank(s)"
        if job.tp > 1:
            layout += f" (TP {job.tp} x DP {dp_world})"
        if job.sp > 1:
            layout += f" (sequence-parallel {job.sp} x DP {dp_world})"
        if self.previous_run is not None:
            self.metrics.message(f"--overwrite-output-dir: the earlier run is in {self.previous_run} until this "
                                 f"run's first checkpoint is complete")
        self.metrics.message(
            f"{'CE-LoRA' if args.method == 'celora' else 'LoRA'} | {Path(job.model_dir).name} | {job.task} | "
            f"{layout} | micro-batch {args.micro_batch} x grad-accum {args.grad_accum} "
            f"| {total_steps} steps ({batches.steps_per_epoch}/epoch) | {args.dtype}"
            + (f" | {args.quantize} base (CE-QLoRA)" if args.quantize else "")
            + (f" | compiled ({args.compile})" if args.compile else "")
            + (f" | resumed at step {step}" if args.resume else "")
            + (f" (saved by {job.resized_from} DP rank(s))" if job.resized_from else ""))

    def evaluate(self, label: str, step: int) -> dict[str, Any]:
        """Held-out loss (and accuracy) split over the DP group; logged to metrics.jsonl and printed."""
        self.watchdog.beat()
        t = time.perf_counter()
        result = evaluate.evaluate(self.engine.module, self.tokenizer, self.job.eval_records, self.args.seq_len,
                                   self.engine.device, group=self.dp_group, progress=self.watchdog.beat)
        if self.args.eval_mode == "generate":
            result.update(generation.generate_eval(self.engine.module, self.tokenizer, self.job.eval_records,
                                                   self.args.seq_len, self.engine.device, self.args.max_new_tokens,
                                                   group=self.dp_group, synced=self.job.zero_stage == 3,
                                                   progress=self.watchdog.beat))
        result["eval_time_s"] = round(time.perf_counter() - t, 2)
        self.metrics.write({"step": step, "eval": label, **result})
        acc = f", accuracy {result['accuracy']:.4f}" if "accuracy" in result else ""
        if "gen_accuracy" in result:
            acc += f", generation exact match {result['gen_accuracy']:.4f}"
        self.watchdog.beat()
        self.metrics.message(f"[{label}] held-out loss {result['eval_loss']:.4f}{acc} "
                             f"on {len(self.job.eval_records)} examples ({result['eval_time_s']} s)")
        return result

    def after_step(self, step: int, record: dict[str, Any]) -> None:
        """``step`` optimizer steps done: log ``record`` (every --log-every steps, on CE-LoRA
        measurements and at the end), then the --save-every checkpoint and --eval-every evaluation
        (the last step's come from the end of the run)."""
        args = self.args
        self.watchdog.beat()
        self.metrics.step(record, write=has_telemetry(record) or step % args.log_every == 0
                          or step == self.total_steps)
        if self.engine.monitor.enabled:  # --report-to / the config's tensorboard, csv_monitor, wandb
            self.engine.monitor.write_events(monitor.events(record))
        if record.get("dx_backend"):
            self.metrics.message(f"[step {step}] dX backend, chosen by measurement: {backend_summary(record['dx_backend'])}")
        self.check_step(step, record)
        if args.save_every and step % args.save_every == 0 and step < self.total_steps:
            self.save(step)
        if args.eval_every and step % args.eval_every == 0 and step < self.total_steps and self.job.eval_records:
            self.evaluate(f"step {step}", step)

    def check_step(self, step: int, record: dict[str, Any]) -> None:
        """Stop every rank together when any rank saw a non-finite loss / gradient norm (TrainingError,
        nothing saved) or received SIGTERM / SIGINT (checkpoint of this step, then StopRequested).

        One MAX all-reduce over the world makes the verdict common even where the ranks' own
        views differ (a signal reaches one rank first): every rank stops at the same step, so no
        rank is left waiting in a collective."""
        import torch
        import torch.distributed as dist

        grad_norm = record.get("grad_norm")
        bad = not math.isfinite(record["loss"]) or (grad_norm is not None and not math.isfinite(grad_norm))
        flags = torch.tensor([float(bad), float(self.stop.signum or 0)], device=self.engine.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0].item() != 0:
            self.close()
            self.raise_not_finite(record)
        if flags[1].item() != 0:
            signum = int(flags[1].item())
            self.save(step)
            self.close()
            raise StopRequested(f"stopped by {signal.Signals(signum).name} after step {record['step']}: checkpoint "
                                f"{checkpoint.tag_for(step)} saved; continue with --resume {self.output_dir}", signum)

    def raise_not_finite(self, record: dict[str, Any]) -> None:
        grad_norm = record.get("grad_norm")
        latest = self.ckpt_dir / checkpoint.LATEST
        kept = (f"the last complete checkpoint ({latest.read_text().strip()}) is untouched" if latest.is_file()
                else "no checkpoint or adapter was written")
        raise TrainingError(f"step {record['step']}: non-finite loss ({record['loss']}) or gradient norm "
                            f"({grad_norm}) on at least one rank; stopped without saving: {kept}. "
                            f"Lower --lr, keep --max-grad-norm on, or check the data of this step")

    def close(self) -> None:
        """The loop is over: close the progress bar, stop intercepting SIGTERM / SIGINT."""
        self.metrics.close()
        self.stop.restore()
        self.watchdog.stop()

    def save(self, step: int) -> None:
        """Checkpoint after ``step`` optimizer steps, with the data position (collective)."""
        self.watchdog.beat()
        job = self.job
        checkpoint.save(self.engine, self.ckpt_dir, step, {"step": step, "data": self.batches.state()}, job.run_info,
                        write_adapter=lambda folder: export_adapter(self.engine.module, folder, str(job.model_dir), job.tp))
        for tag in checkpoint.rotate(self.ckpt_dir, self.args.save_total_limit):
            self.metrics.message(f"removed checkpoint {tag} (--save-total-limit {self.args.save_total_limit})")
        self.watchdog.beat()
        if self.previous_run is not None:  # this run now has a complete checkpoint of its own
            outputs.remove_previous_run(self.previous_run)
            self.metrics.message(f"removed the earlier run set aside in {self.previous_run}")
            self.previous_run = None


class StopSignals:
    """SIGTERM (Slurm's warning before a kill) and SIGINT are noted, not acted on at once: the run
    checkpoints at the next optimizer-step boundary and exits (Run.check_step). A second SIGINT
    interrupts immediately."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._note)

    def restore(self) -> None:
        """Put the handlers back (the run's loop is over; main() may be called in-process)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _note(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


class Watchdog:
    """Fails this rank when the loop makes no progress for ``timeout_s`` (--dist-timeout).

    The process group's own timeout covers most collectives, but not all: measured here, a
    gloo all-reduce inside DeepSpeed's ZeRO-2 gradient reduction waited > 90 s with a 10 s
    timeout while its peer was SIGSTOPped. The loop beats after every optimizer step,
    checkpoint and evaluated example; a rank stuck past the timeout prints why and exits 1 from this
    thread (the main thread is blocked inside C++ and cannot be interrupted), so the
    launcher (DeepSpeed, srun --kill-on-bad-exit, mpirun) ends the job. The timeout must
    exceed one optimizer step with its checkpoint or evaluation.
    """

    def __init__(self, timeout_s: float, output_dir: str) -> None:
        self.timeout_s, self.output_dir = timeout_s, output_dir
        self.last = time.monotonic()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="celora-watchdog", daemon=True)
        self.thread.start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def _watch(self) -> None:
        import os
        import sys

        while not self.done.wait(min(5.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                print(f"error: no progress for {idle:.0f} s (--dist-timeout {self.timeout_s:g}): another rank "
                      f"stopped responding (hung, stopped or lost), or one step takes longer than the timeout. "
                      f"Continue from the last complete checkpoint with --resume {self.output_dir}",
                      file=sys.stderr, flush=True)
                os._exit(1)  # the main thread is stuck in a collective: nothing else would end this rank
