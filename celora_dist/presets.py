"""Named CE-LoRA configurations: the released one and the measured speed preset.

    cfg = preset("fast")                       # library (also for for_trainer)
    python launch/train.py --preset fast       # trainer; later flags still override

A preset is a set of CELoRAConfig fields, chosen from measurements (BENCHMARKS.md, "Pareto:
speed vs accuracy"), and judged by the share of LoRA's accuracy gain it keeps across tasks
(BENCHMARKS.md "The suite at lr 1e-3"; ``bench/accuracy.py``); explicit fields passed to
:func:`preset` or given as trainer flags win.
"""
from __future__ import annotations

from typing import Any

from .config import AUTO, CELoRAConfig

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PRESETS: dict[str, dict[str, Any]] = {
    # the CE-LoRA authors' configuration (CELoRAConfig's defaults)
    "released": {},
    # all seven projections adaptive under an error budget, with the vocab-sparse head: the
    # fastest point of the PIQA sweep within 1 accuracy point of LoRA (BENCHMARKS.md "Pareto";
    # step 1.16x at 512 tokens, 1.09x at 2048 on the AMD VM; 1.07x / 1.11x, inside the noise,
    # on the Intel VM). Across the suite (BENCHMARKS.md "The suite at lr 1e-3": 3 deciding
    # tasks x 3 seeds, every approximate layer approximated) it keeps 74 % of LoRA's gain at
    # worst (PIQA) and 82 % at the median (the released config: 53 % / 73 %). Budget 0.5 was
    # faster (1.23x / 1.18x) but lost 1.9 PIQA points.
    "fast": {"keep": {name: AUTO for name in SEVEN}, "exact": [], "error_budget": 0.3, "head_keep": 0.1},
}


def preset(name: str, **overrides: Any) -> CELoRAConfig:
    """The CELoRAConfig of preset ``name`` with ``overrides`` (CELoRAConfig fields) applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown CE-LoRA preset {name!r}; choose from {sorted(PRESETS)}")
    fields = CELoRAConfig().to_dict()
    fields.update(PRESETS[name])
    fields.update(overrides)
    return CELoRAConfig.from_dict(fields)
