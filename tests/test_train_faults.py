"""Faults (docs/faults.md), with real trainer processes on the tiny model: an earlier run in
--output-dir is refused, replaced only when told to and only after the new run's first
checkpoint exists; a non-finite loss stops every rank before anything is saved over a good
checkpoint; SIGTERM (to one rank) checkpoints the current step on every rank and exits
128 + 15, and --resume continues from there."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from .train_utils import (CRASH_AT_SAVE, REPO, TINY_FLAGS, TRAIN, env, free_port, read_metrics, run_train, show,
                          steps_logged, wait_for_steps)

NAN_AT_STEP = REPO / "tests" / "nan_at_step.py"
# Short 2-rank runs per parallel layout in the clean-exit stress test (~13 s each on 2 cores).
STRESS_RUNS = int(os.environ.get("CELORA_STRESS_RUNS", "8"))


def _flags(assets, steps: int) -> list[str]:
    return ["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS, "--max-steps", str(steps),
            "--save-every", "2", "--eval-samples", "8"]


def _snapshot(out: Path) -> dict[str, str]:
    """Every file under ``out`` (relative path -> sha256): what 'unchanged' means."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "run"
    proc = run_train(_flags(assets, 4) + ["--output-dir", str(out)])
    assert proc.returncode == 0, show(proc)
    assert (out / "adapter").is_dir() and (out / "checkpoints" / "latest").read_text() == "step000004"
    return out


def test_bad_output_dirs_fail_fast_in_process(assets, finished_run, tmp_path):
    """UsageError naming the way on, before any work; the earlier run is untouched."""
    from celora_dist.train.cli import UsageError, parse_args

    before = _snapshot(finished_run)
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    base = _flags(assets, 2)
    cases = [
        (["--output-dir", str(finished_run)],
         rf"--output-dir {finished_run} already holds a run \(metrics.jsonl, summary.json, adapter, checkpoints\); "
         rf"continue it with --resume {finished_run}, replace it with --overwrite-output-dir"),
        (["--output-dir", str(afile)], r"--output-dir .*afile: is a file, not a folder"),
        (["--output-dir", str(finished_run), "--resume", str(finished_run), "--overwrite-output-dir"],
         r"give --resume .* or --overwrite-output-dir .*, not both"),
        (["--output-dir", str(other), "--resume", str(finished_run)],
         r"--output-dir .*other already holds another run \(checkpoints\); resume .* into its own folder"),
    ]
    for extra, pattern in cases:
        with pytest.raises(UsageError, match=pattern):
            parse_args(base + extra)
    assert _snapshot(finished_run) == before
    # continuing the run in its own folder, or an empty/new folder, is fine
    assert parse_args(base + ["--output-dir", str(finished_run), "--resume", str(finished_run)]).resume_tag == "step000004"
    assert parse_args(base + ["--output-dir", str(tmp_path / "fresh")]).overwrite_output_dir is False


def test_fresh_run_into_a_run_folder_exits_2_and_changes_nothing(assets, finished_run):
    before = _snapshot(finished_run)
    proc = run_train(_flags(assets, 2) + ["--output-dir", str(finished_run)], timeout=120)
    assert proc.returncode == 2, show(proc)
    assert "error: --output-dir" in proc.stderr and "--overwrite-output-dir" in proc.stderr, show(proc)
    assert "Traceback" not in proc.stderr
    assert _snapshot(finished_run) == before


def test_overwrite_keeps_the_earlier_run_until_the_new_first_checkpoint(assets, finished_run):
    """A replacing run that dies inside its first checkpoint save leaves the earlier run whole (moved
    aside); a replacing run that gets its first checkpoint deletes only what it set aside itself."""
    out = finished_run
    before = _snapshot(out)
    notes = out / "notes.txt"  # not a run's file: never moved, never deleted
    notes.write_text("mine")
    crashed = run_train(["--crash-at-save", "2", *_flags(assets, 4), "--output-dir", str(out),
                         "--overwrite-output-dir"], script=CRASH_AT_SAVE)
    assert crashed.returncode == 17, show(crashed)
    kept = sorted(out.glob(".previous-run-*"))
    assert len(kept) == 1, sorted(p.name for p in out.iterdir())
    assert _snapshot(kept[0]) == before  # every file of the earlier run, byte for byte
    assert not (out / "checkpoints" / "latest").exists()  # the crashed run committed nothing

    replaced = run_train(_flags(assets, 4) + ["--output-dir", str(out), "--overwrite-output-dir"])
    assert replaced.returncode == 0, show(replaced)
    assert sorted(out.glob(".previous-run-*")) == kept  # the crashed run's partial files are gone again
    assert _snapshot(kept[0]) == before
    assert notes.read_text() == "mine"
    assert (out / "checkpoints" / "latest").read_text() == "step000004"
    assert [r["step"] for r in read_metrics(out) if "loss" in r and "eval" not in r] == [0, 1, 2, 3]
    assert "removed the earlier run set aside" in replaced.stdout + replaced.stderr


def test_non_finite_loss_on_one_rank_stops_all_before_saving(assets, tmp_path):
    """NaN on rank 1 at step 3 (2 ranks, ZeRO-2, checkpoint every 2 steps): both ranks stop at step 3
    with an error naming it; step 2's checkpoint stays the latest, no adapter or summary is written."""
    out = tmp_path / "nan"
    proc = run_train(["--nan-at-step", "3", "--nan-rank", "1", *_flags(assets, 6), "--no-final-eval",
                      "--deepspeed_config", "ds_configs/zero2.json", "--output-dir", str(out)],
                     nproc=2, script=NAN_AT_STEP)
    assert proc.returncode != 0, show(proc)
    text = proc.stdout + proc.stderr
    assert "error: step 3: non-finite loss (nan)" in text, show(proc)
    assert "the last complete checkpoint (step000002) is untouched" in text, show(proc)
    assert (out / "checkpoints" / "latest").read_text() == "step000002"
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    steps = [r["step"] for r in read_metrics(out) if "loss" in r and "eval" not in r]
    assert steps == [0, 1, 2, 3]  # the bad step is logged, nothing after it ran


def _start(args: list[str], nproc: int, log: Path) -> subprocess.Popen:
    """The trainer in the background, its output to ``log`` (a pipe nobody reads while the test
    waits could fill up and stall the ranks)."""
    cmd = [sys.executable, str(TRAIN), *args] if nproc == 1 else [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
        str(free_port()), str(TRAIN), *args]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float) -> tuple[int, str]:
    """Wait for ``proc`` (killing its process tree if it overruns); (exit status, output)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.kill()
        proc.wait()
        return -1, log.read_text() + f"\n[test: killed after {timeout} s]"
    return proc.returncode, log.read_text()


def _ranks(proc: subprocess.Popen, nproc: int) -> list[psutil.Process]:
    """The trainer's rank processes in local-rank order: the script itself, not DeepSpeed's
    launchers that name it in their arguments."""
    ranks = [p for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
             if str(TRAIN) in p.cmdline() and "deepspeed.launcher" not in " ".join(p.cmdline())]
    assert len(ranks) == nproc, [p.cmdline() for p in ranks]
    return sorted(ranks, key=lambda p: next((a for a in p.cmdline() if a.startswith("--local_rank=")), ""))


def _sigterm_after(proc: subprocess.Popen, out: Path, steps: int, nproc: int) -> tuple[int, str]:
    """Once ``steps`` steps are logged, SIGTERM one rank (the last: the signal reaches one rank first,
    as srun's may); returns (exit status, output)."""
    log = out.parent / f"{out.name}.log"
    wait_for_steps(proc, out, steps, log)
    _ranks(proc, nproc)[-1].send_signal(signal.SIGTERM)
    return _finish(proc, log, 180)


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_checkpoints_the_step_and_resume_continues(assets, tmp_path, nproc):
    out = tmp_path / f"term{nproc}"
    flags = ["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS, "--eval-samples", "8",
             "--no-final-eval", "--micro-batch", "2"]
    proc = _start(flags + ["--max-steps", "400", "--output-dir", str(out)], nproc, tmp_path / f"term{nproc}.log")
    rc, text = _sigterm_after(proc, out, 3, nproc)
    assert rc == 128 + signal.SIGTERM, text[-4000:]
    assert "stopped by SIGTERM after step" in text and "Traceback" not in text, text[-4000:]
    done = steps_logged(out)  # every rank stopped after the same step, whose checkpoint is complete
    tag = (out / "checkpoints" / "latest").read_text()
    assert tag == f"step{done:06d}" and (out / "checkpoints" / tag / "COMPLETE").is_file()
    assert not (out / "adapter").exists()
    resumed = run_train(flags + ["--max-steps", str(done + 2), "--output-dir", str(out), "--resume", str(out)],
                        nproc=nproc)
    assert resumed.returncode == 0, show(resumed)
    assert [r["step"] for r in read_metrics(out) if "loss" in r and "eval" not in r] == list(range(done + 2))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("config", ["ds_configs/tp2_zero1.json", "ds_configs/zero3.json"])
def test_repeated_two_rank_runs_all_exit_cleanly(assets, tmp_path, config):
    """A finished run exits 0 on every rank, every time (a rank once died in its exit with
    'terminate called without an active exception', turning a finished run into status 250)."""
    failures = []
    for i in range(STRESS_RUNS):
        proc = run_train(["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS,
                          "--max-steps", "2", "--no-final-eval", "--deepspeed_config", config,
                          "--output-dir", str(tmp_path / f"run{i}")], nproc=2)
        if proc.returncode != 0 or "terminate called" in proc.stderr:
            failures.append(f"run {i}: {show(proc)[-2500:]}")
    assert not failures, "\n\n".join(failures)


def test_a_stopped_rank_fails_the_job_within_the_timeout_and_the_run_resumes(assets, tmp_path):
    """SIGSTOP one of two ranks (a hang, not a death): the other fails after --dist-timeout with a
    message (its collective times out, or the watchdog ends it), DeepSpeed's launcher then kills
    the stopped rank (its 30 s grace), and --resume continues from the last complete checkpoint."""
    out = tmp_path / "hang"
    flags = ["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS, "--eval-samples", "8",
             "--no-final-eval", "--micro-batch", "2", "--save-every", "2"]
    proc = _start(flags + ["--max-steps", "400", "--dist-timeout", "10", "--output-dir", str(out)], 2,
                  tmp_path / "hang.log")
    wait_for_steps(proc, out, 3, tmp_path / "hang.log")
    stopped_at = time.time()
    _ranks(proc, 2)[1].suspend()  # SIGSTOP
    rc, text = _finish(proc, tmp_path / "hang.log", 10 + 30 + 60)
    took = time.time() - stopped_at
    assert rc != 0, text[-4000:]
    # the stuck collective fails by the process group's timeout, or the watchdog ends the rank
    assert ("error: a collective operation did not complete within --dist-timeout" in text
            or "error: no progress for" in text), text[-4000:]
    assert took < 10 + 5 + 30 + 25, took  # timeout, watchdog poll, the launcher's grace before SIGKILL, slack
    tag = (out / "checkpoints" / "latest").read_text()
    done = int(tag.removeprefix("step"))
    assert done >= 2 and (out / "checkpoints" / tag / "COMPLETE").is_file()
    resumed = run_train(flags + ["--max-steps", str(done + 2), "--output-dir", str(out), "--resume", str(out)],
                        nproc=2)
    assert resumed.returncode == 0, show(resumed)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_killed_rank_ends_the_job_within_seconds_and_the_run_resumes(assets, tmp_path):
    """SIGKILL one of two ranks under DeepSpeed's launcher: the job ends non-zero within seconds
    (the launcher sees the death and kills the other rank) and --resume continues."""
    out = tmp_path / "kill"
    flags = ["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS, "--eval-samples", "8",
             "--no-final-eval", "--micro-batch", "2", "--save-every", "2"]
    proc = _start(flags + ["--max-steps", "400", "--output-dir", str(out)], 2, tmp_path / "kill.log")
    wait_for_steps(proc, out, 3, tmp_path / "kill.log")
    killed_at = time.time()
    _ranks(proc, 2)[1].kill()
    rc, text = _finish(proc, tmp_path / "kill.log", 60)
    assert rc not in (0, -1), text[-4000:]
    assert time.time() - killed_at < 40, text[-2000:]  # seconds (~5 here), not the 30-minute collective timeout
    tag = (out / "checkpoints" / "latest").read_text()
    done = int(tag.removeprefix("step"))
    resumed = run_train(flags + ["--max-steps", str(done + 2), "--output-dir", str(out), "--resume", str(out)],
                        nproc=2)
    assert resumed.returncode == 0, show(resumed)
    assert [r["step"] for r in read_metrics(out) if "loss" in r and "eval" not in r][-2:] == [done, done + 1]
