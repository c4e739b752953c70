"""launch/train.py with a crash injected into one checkpoint save (tests/test_train_distributed.py).

    deepspeed --num_gpus 2 tests/crash_at_save.py --crash-at-save 20 <launch/train.py flags>

At step N every rank writes its checkpoint files, waits for the others, then exits with
status 17 just before ``celora_dist.train.checkpoint.commit``: the tag is never marked
COMPLETE and ``latest`` still names the previous checkpoint, as after a real crash
mid-save. Every other flag goes to launch/train.py unchanged; the fault injection lives
here, not in the package.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[1] / "launch" / "train.py"
FLAG = "--crash-at-save"
EXIT_STATUS = 17


def crash_step(argv: list[str]) -> tuple[int, list[str]]:
    """(N, the other arguments) from ``--crash-at-save N`` anywhere in argv."""
    if FLAG not in argv[:-1]:
        sys.exit(f"usage: {Path(__file__).name} {FLAG} STEP [launch/train.py flags]")
    i = argv.index(FLAG)
    return int(argv[i + 1]), argv[:i] + argv[i + 2:]


def main() -> None:
    step, rest = crash_step(sys.argv[1:])
    import torch.distributed as dist

    from celora_dist.train import checkpoint

    commit = checkpoint.commit

    def commit_or_crash(ckpt_dir, tag, run):
        if tag == checkpoint.tag_for(step):
            dist.barrier()  # every rank has written its step-N files
            print(f"{FLAG} {step}: simulating a crash before the checkpoint is committed", flush=True)
            os._exit(EXIT_STATUS)
        commit(ckpt_dir, tag, run)

    checkpoint.commit = commit_or_crash  # checkpoint.save looks it up at call time
    sys.argv = [str(TRAIN), *rest]
    runpy.run_path(str(TRAIN), run_name="__main__")


if __name__ == "__main__":
    main()
