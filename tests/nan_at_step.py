"""launch/train.py with a NaN loss injected on one rank (tests/test_train_faults.py).

    deepspeed --num_gpus 2 tests/nan_at_step.py --nan-at-step 3 --nan-rank 1 <launch/train.py flags>

The training forward (``DeepSpeedEngine.forward``, the call the loop makes per micro-batch;
evaluation calls the module directly) of rank R at its micro-batch number S (0-based:
optimizer step S with grad-accum 1) returns a NaN loss; its backward then fills that
rank's gradients with NaN. The fault injection lives here, not in the package.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[1] / "launch" / "train.py"


def _take(argv: list[str], flag: str) -> tuple[int, list[str]]:
    if flag not in argv[:-1]:
        sys.exit(f"usage: {Path(__file__).name} --nan-at-step S --nan-rank R [launch/train.py flags]")
    i = argv.index(flag)
    return int(argv[i + 1]), argv[:i] + argv[i + 2:]


def main() -> None:
    at, rest = _take(sys.argv[1:], "--nan-at-step")
    rank, rest = _take(rest, "--nan-rank")
    from deepspeed.runtime.engine import DeepSpeedEngine

    forward = DeepSpeedEngine.forward
    calls = {"n": 0}

    def forward_with_nan(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if int(os.environ.get("RANK", "0")) == rank and self.module.training:
            if calls["n"] == at:
                out.loss = out.loss * float("nan")
            calls["n"] += 1
        return out

    DeepSpeedEngine.forward = forward_with_nan
    sys.argv = [str(TRAIN), *rest]
    runpy.run_path(str(TRAIN), run_name="__main__")


if __name__ == "__main__":
    main()
