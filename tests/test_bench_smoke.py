"""bench/layer_backward.py --smoke runs end to end and prints a well-formed table.

No timing assertions (the machine is shared); the numbers must be finite and positive,
and the ratio columns must be the ratios of the printed times.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "layer_backward.py"


def _load():
    spec = importlib.util.spec_from_file_location("layer_backward", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_smoke(capsys):
    bench = _load()
    rows = bench.main(["--device", "cpu", "--smoke"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(bench.COLUMNS)
    assert set(header) >= {"dense_ms", "torch_ms", "triton_ms", "ceiling", "torch_x", "torch_%ceil"}
    assert len(lines) == 2 + len(rows) == 2 + 2 * len(bench.KEEPS)  # header, rule, 2 shapes x 4 keeps
    for row in rows:
        for col in ("dense_ms", "torch_ms", "ceiling", "torch_x", "torch_%ceil"):
            assert math.isfinite(row[col]) and row[col] > 0, (col, row)
        assert math.isnan(row["triton_ms"])  # CPU: the Triton path is CUDA only
        assert abs(row["torch_x"] - row["dense_ms"] / row["torch_ms"]) < 1e-9 * row["torch_x"]
        assert row["k"] == math.ceil(row["keep"] * row["m"])
        expected = 1.0 if row["keep"] == 1.0 else row["m"] / (row["k"] + bench.R0 + bench.R)
        assert abs(row["ceiling"] - expected) < 1e-12
