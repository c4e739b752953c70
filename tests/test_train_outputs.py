"""No lost work: an earlier run in --output-dir is refused, replaced only when told to and
only after the new run's first checkpoint exists; a non-finite loss stops every rank before
anything is saved over a good checkpoint. Real trainer processes on the tiny model."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from .train_utils import CRASH_AT_SAVE, REPO, TINY_FLAGS, read_metrics, run_train, show

NAN_AT_STEP = REPO / "tests" / "nan_at_step.py"


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
