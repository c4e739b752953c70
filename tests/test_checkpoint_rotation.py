"""--save-total-limit: which checkpoint folders checkpoint.rotate deletes (in-process, no training)."""
from __future__ import annotations

from celora_dist.train import checkpoint


def make(root, steps_complete, steps_partial, latest):
    for step in steps_complete + steps_partial:
        tag = root / checkpoint.tag_for(step)
        tag.mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if step in steps_complete:
            (tag / checkpoint.COMPLETE).write_bytes(b"")
    (root / checkpoint.LATEST).write_text(checkpoint.tag_for(latest))


def names(root):
    return sorted(d.name for d in root.glob("step*"))


def test_keeps_the_newest_complete_and_never_a_partial_save(tmp_path):
    make(tmp_path, [2, 4, 6, 8], [10], latest=8)  # step 10: a save in progress (no COMPLETE yet)
    assert checkpoint.rotate(tmp_path, 2) == ["step000002", "step000004"]
    assert names(tmp_path) == ["step000006", "step000008", "step000010"]


def test_never_deletes_the_tag_latest_names(tmp_path):
    make(tmp_path, [2, 4, 6], [], latest=2)  # e.g. latest rolled back by hand
    assert checkpoint.rotate(tmp_path, 1) == ["step000004"]
    assert names(tmp_path) == ["step000002", "step000006"]


def test_zero_keeps_everything(tmp_path):
    make(tmp_path, [1, 2, 3], [], latest=3)
    assert checkpoint.rotate(tmp_path, 0) == []
    assert names(tmp_path) == ["step000001", "step000002", "step000003"]
