"""Named configs (celora_dist/presets.py): the library call and the trainer's --preset agree,
and explicit settings override a preset's fields."""
from __future__ import annotations

import pytest

from celora_dist import CELoRAConfig, preset
from celora_dist.presets import PRESETS, SEVEN
from celora_dist.train.cli import build_parser, celora_config_from_args


def _cli(*argv: str) -> CELoRAConfig:
    return celora_config_from_args(build_parser().parse_args(list(argv)))


def test_released_is_the_default_config():
    assert preset("released") == CELoRAConfig()
    assert _cli("--preset", "released") == CELoRAConfig()


def test_fast_preset_fields_and_overrides():
    fast = preset("fast")
    assert fast.keep == {name: "auto" for name in SEVEN} and fast.exact == ()
    assert (fast.error_budget, fast.head_keep) == (PRESETS["fast"]["error_budget"], PRESETS["fast"]["head_keep"])
    assert preset("fast", head_keep=None, r=8).head_keep is None and preset("fast", r=8).r == 8
    assert _cli("--preset", "fast") == fast
    tuned = _cli("--preset", "fast", "--error-budget", "0.2", "--head-keep", "0.05", "--keep", "q_proj=1")
    assert (tuned.error_budget, tuned.head_keep) == (0.2, 0.05)
    assert "q_proj" in tuned.exact and "q_proj" not in tuned.keep and tuned.keep["v_proj"] == "auto"


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown CE-LoRA preset 'turbo'"):
        preset("turbo")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--preset", "turbo"])
    with pytest.raises(ValueError, match="unknown field"):
        preset("fast", keeep=0.5)
