"""launch/mpirun.sh under real Open MPI, launch/_rank_env.sh under MPICH's mpiexec, and the
Slurm batch script on a one-node Slurm cluster started by the test (slurmctld + slurmd on
localhost, auth/none).

All need system packages (openmpi-bin, mpich, slurm-wlm) that .ci/run installs. Outside CI a
missing package skips with the reason; under CI (CI=true) it fails instead.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .train_utils import REPO, TINY_FLAGS, env, free_port, read_metrics, show, train_losses, wait_for_steps


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} not installed: .ci/run must install openmpi-bin, mpich and slurm-wlm")
        pytest.skip(f"{missing} not installed (apt-get install openmpi-bin mpich slurm-wlm)")


def trainer_args(assets, out: Path, steps: int) -> list[str]:
    return ["--model", str(assets["model"]), "--data", str(assets["mc"]), "--max-steps", str(steps),
            "--eval-samples", "16", "--no-zero-shot", *TINY_FLAGS] + (["--output-dir", str(out)] if out else [])


def test_mpich_mpiexec_two_ranks_train(assets, tmp_path):
    """MPICH's process manager (PMI_RANK / PMI_SIZE / MPI_LOCALRANKID) through launch/_rank_env.sh."""
    require("mpiexec.mpich")
    out = tmp_path / "run"
    e = env()
    e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run(["timeout", "-k", "10", "240", "mpiexec.mpich", "-n", "2", "bash",
                           str(REPO / "launch" / "_rank_env.sh"), *trainer_args(assets, out, 6)],
                          cwd=REPO, env=e, capture_output=True, text=True)
    assert proc.returncode == 0, show(proc)
    assert "x 2 rank(s)" in proc.stdout + proc.stderr, show(proc)
    assert len(train_losses(out)) == 6
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_mpirun_two_ranks_train(assets, tmp_path):
    require("mpirun")
    out = tmp_path / "run"
    e = env()
    e["MASTER_PORT"] = str(free_port())
    proc = subprocess.run(["timeout", "-k", "10", "240", "bash", str(REPO / "launch" / "mpirun.sh"),
                           "-np", "2", "--", *trainer_args(assets, out, 8)],
                          cwd=REPO, env=e, capture_output=True, text=True)
    assert proc.returncode == 0, show(proc)
    assert "x 2 rank(s)" in proc.stdout + proc.stderr, show(proc)
    losses = train_losses(out)
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_mpirun_a_killed_rank_ends_the_job_within_seconds_and_the_run_resumes(assets, tmp_path):
    """SIGKILL one of two Open MPI ranks: mpirun aborts the job non-zero within seconds and
    launch/mpirun.sh with --resume continues from the last complete checkpoint."""
    import psutil

    require("mpirun")
    out, log = tmp_path / "run", tmp_path / "mpirun.log"
    e = env()
    e["MASTER_PORT"] = str(free_port())
    flags = trainer_args(assets, out, 400)[:-2] + ["--save-every", "2", "--no-final-eval"]  # no --output-dir yet
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", str(REPO / "launch" / "mpirun.sh"), "-np", "2", "--", *flags,
                                 "--output-dir", str(out)], cwd=REPO, env=e, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for_steps(proc, out, 3, log)
        rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "train.py" in " ".join(p.cmdline()) and p.environ().get("OMPI_COMM_WORLD_RANK") == "1"]
        assert len(rank1) == 1, [p.cmdline() for p in psutil.Process(proc.pid).children(recursive=True)]
        killed_at = time.time()
        rank1[0].kill()
        proc.wait(timeout=60)
        assert time.time() - killed_at < 40  # seconds (~3 here), not a hang
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            p.kill()
    assert proc.returncode != 0, log.read_text()[-4000:]
    done = int((out / "checkpoints" / "latest").read_text().removeprefix("step"))
    e["MASTER_PORT"] = str(free_port())
    resumed = subprocess.run(["timeout", "-k", "10", "240", "bash", str(REPO / "launch" / "mpirun.sh"), "-np", "2",
                              "--", *trainer_args(assets, out, done + 2), "--resume", str(out)],
                             cwd=REPO, env=e, capture_output=True, text=True)
    assert resumed.returncode == 0, show(resumed)
    assert [r["step"] for r in read_metrics(out) if "loss" in r and "eval" not in r][-2:] == [done, done + 1]


SLURM_CONF = """\
ClusterName=celoratest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
NodeName=localhost CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture
def slurm_cluster(tmp_path):
    """A one-node Slurm 'cluster' on localhost; yields the environment for sbatch."""
    require("slurmctld", "slurmd", "sbatch")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmd as root (SlurmdUser=root)")
    d = tmp_path / "slurm"
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir(parents=True)
    conf = d / "slurm.conf"
    conf.write_text(SLURM_CONF.format(dir=d, ctld_port=free_port(), d_port=free_port()))
    e = env()
    e["SLURM_CONF"] = str(conf)
    subprocess.run(["slurmctld", "-f", str(conf)], env=e, check=True, timeout=30)
    subprocess.run(["slurmd", "-f", str(conf)], env=e, check=True, timeout=30)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            info = subprocess.run(["sinfo", "-h", "-o", "%t"], env=e, capture_output=True, text=True)
            if info.stdout.strip() == "idle":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"Slurm node never became idle: {info.stdout} {info.stderr}\n"
                        + (d / "log" / "slurmctld.log").read_text()[-2000:])
        yield e
    finally:
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            pid = d / pid_file
            if pid.exists():
                try:
                    os.kill(int(pid.read_text()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass


def sbatch(e: dict, out_dir: Path, log: Path, args: list[str]) -> subprocess.CompletedProcess:
    """Submit launch/slurm/one_node.sbatch overriding only what a CPU-only test node needs."""
    e = dict(e, OUTPUT_DIR=str(out_dir), MASTER_PORT=str(free_port()))
    cmd = ["sbatch", "--wait", "--partition=debug", "--gpus-per-node=0", "--ntasks-per-node=2",
           "--cpus-per-task=1", "--time=10", f"--output={log}", str(REPO / "launch/slurm/one_node.sbatch"), *args]
    return subprocess.run(["timeout", "-k", "10", "300", *cmd], cwd=REPO, env=e, capture_output=True, text=True)


def test_slurm_batch_script_trains_two_ranks_and_resumes_after_requeue(slurm_cluster, assets, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    proc = sbatch(slurm_cluster, out, log, trainer_args(assets, None, 6))
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, show(proc) + text[-4000:]
    assert "2 rank(s)" in text and "x 2 rank(s)" in text, text[-4000:]
    first = train_losses(out)
    assert len(first) == 6 and first[-1] < first[0], first

    # A requeued job (same OUTPUT_DIR) resumes from the latest checkpoint instead of restarting.
    log2 = tmp_path / "job2.log"
    proc = sbatch(slurm_cluster, out, log2, trainer_args(assets, None, 10))
    text2 = log2.read_text() if log2.exists() else ""
    assert proc.returncode == 0, show(proc) + text2[-4000:]
    assert "resuming from" in text2, text2[-4000:]
    steps = [r["step"] for r in read_metrics(out) if "loss" in r and "eval" not in r and "step" in r]
    assert steps == list(range(10)), steps  # steps 6..9 continued the log; nothing re-ran
    assert json.loads((out / "summary.json").read_text())["steps"] == 10


def _job_ranks(psutil, out: Path) -> dict:
    """{SLURM_PROCID: process} of the trainer ranks writing to ``out``."""
    ranks = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "train.py" in " ".join(p.info["cmdline"] or []) and p.environ().get("OUTPUT_DIR") == str(out):
                ranks[p.environ().get("SLURM_PROCID")] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return ranks


def test_slurm_a_killed_rank_ends_the_job_and_a_new_job_resumes(slurm_cluster, assets, tmp_path):
    """SIGKILL one of the batch script's two ranks: srun --kill-on-bad-exit ends the job
    non-zero within seconds; the next job on the same OUTPUT_DIR resumes from its checkpoint."""
    import psutil

    out, log = tmp_path / "run", tmp_path / "job.log"
    e = dict(slurm_cluster, OUTPUT_DIR=str(out), MASTER_PORT=str(free_port()))
    cmd = ["sbatch", "--wait", "--partition=debug", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
           "--time=10", f"--output={log}", str(REPO / "launch/slurm/one_node.sbatch"),
           *trainer_args(assets, None, 400), "--save-every", "2", "--no-final-eval"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_steps(proc, out, 3, log)
        ranks = _job_ranks(psutil, out)
        assert sorted(ranks) == ["0", "1"], ranks
        killed_at = time.time()
        ranks["1"].kill()
        while _job_ranks(psutil, out):  # srun --kill-on-bad-exit ends the other rank
            assert time.time() - killed_at < 30, _job_ranks(psutil, out)
            time.sleep(0.2)
        proc.wait(timeout=120)  # sbatch --wait notices the job's end on its own polling interval
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, log.read_text()[-4000:]
    done = int((out / "checkpoints" / "latest").read_text().removeprefix("step"))
    proc = sbatch(slurm_cluster, out, tmp_path / "job2.log", trainer_args(assets, None, done + 2))
    text = (tmp_path / "job2.log").read_text()
    assert proc.returncode == 0, show(proc) + text[-4000:]
    assert "resuming from" in text, text[-4000:]
    assert [r["step"] for r in read_metrics(out) if "loss" in r and "eval" not in r][-2:] == [done, done + 1]
