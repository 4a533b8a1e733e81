"""The labeled store keeps model inputs, never a path a client names."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from cxr_platform.disk import DiskBudget, free_bytes
from cxr_platform.inference.retained import RetainedInputs


def test_feedback_moves_an_input_into_the_labeled_store(tmp_path):
    store = RetainedInputs(tmp_path)
    pixels = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    store.keep("a" * 32, pixels)
    store.keep("b" * 32, pixels[::-1])
    assert store.labeled_ids() == set()
    assert store.mark_labeled("a" * 32)
    assert store.mark_labeled("a" * 32)  # a second (corrected) label keeps it there
    assert not store.mark_labeled("c" * 32)  # never kept
    ids, images = store.load_labeled(["c" * 32, "a" * 32])
    assert ids == ["a" * 32]
    assert np.array_equal(images[0], pixels)
    assert not any(p.name.endswith(".tmp") for p in store.pending.iterdir())


def test_client_ids_never_name_a_path(tmp_path):
    store = RetainedInputs(tmp_path / "store")
    (tmp_path / "secret.png").write_bytes(b"x")
    assert not store.mark_labeled("../../secret")
    assert store.load_labeled(["../secret"])[0] == []
    with pytest.raises(ValueError, match="not a request id"):
        store.keep("../escape", np.zeros((8, 8), np.uint8))


def test_prune_removes_only_old_unlabeled_inputs(tmp_path):
    store = RetainedInputs(tmp_path)
    pixels = np.zeros((16, 16), np.uint8)
    for request_id in ("old0000001", "new0000001", "lab0000001"):
        store.keep(request_id, pixels)
    store.mark_labeled("lab0000001")
    old = store.pending / "old0000001.npy"
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert store.prune(max_age_seconds=60) == 1
    assert not old.exists()
    assert (store.pending / "new0000001.npy").exists()
    assert store.labeled_ids() == {"lab0000001"}


def _sizes(store: RetainedInputs) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in store.root.rglob("*") if path.is_file()}


def test_past_its_budget_the_store_frees_the_oldest_unlabeled_inputs_and_never_labeled_ones(
    tmp_path,
):
    pixels = np.full((64, 64), 7, np.uint8)
    one_input = RetainedInputs(tmp_path / "probe")
    one_input.keep("probe00001", pixels)
    size = one_input.used_bytes()
    evicted: list[int] = []
    skipped: list[str] = []
    store = RetainedInputs(
        tmp_path / "store",
        DiskBudget(max_bytes=3 * size),
        on_evicted=evicted.append,
        on_skipped=skipped.append,
    )
    for n in range(5):
        assert store.keep(f"input{n:05d}", pixels)
        time.sleep(0.01)  # distinct modification times for the restart below
    assert sorted(p.stem for p in store.pending.iterdir()) == [
        "input00002",
        "input00003",
        "input00004",
    ]
    assert sum(evicted) == 2 and not skipped
    assert sum(_sizes(store).values()) <= 3 * size

    # Labeled inputs stay; a restarted store finds the oldest unlabeled one from the files.
    assert store.mark_labeled("input00003")
    restarted = RetainedInputs(tmp_path / "store", DiskBudget(max_bytes=3 * size))
    assert restarted.used_bytes() == sum(_sizes(store).values())
    assert restarted.keep("input00005", pixels)
    assert restarted.keep("input00006", pixels)
    assert restarted.labeled_ids() == {"input00003"}
    assert sorted(p.stem for p in restarted.pending.iterdir()) == ["input00005", "input00006"]


def test_a_store_full_of_labeled_inputs_stops_keeping_new_ones_and_says_so_once(tmp_path, caplog):
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    skipped: list[str] = []
    store = RetainedInputs(tmp_path, on_skipped=skipped.append)
    for n in range(2):
        store.keep(f"label{n:05d}", pixels)
        store.mark_labeled(f"label{n:05d}")
    store.budget = DiskBudget(max_bytes=store.used_bytes() + 100)
    with caplog.at_level("INFO", logger="cxr_platform.inference.retained"):
        assert not store.keep("new0000001", pixels)
        assert not store.keep("new0000002", pixels)
        assert skipped == ["budget", "budget"]
        assert store.labeled_ids() == {"label00000", "label00001"}
        assert not store.pending.exists() or not any(store.pending.iterdir())
        store.budget = DiskBudget()
        assert store.keep("new0000003", pixels)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("not keeping new inputs" in m for m in messages) == 1, messages
    assert sum("keeping inputs for feedback again" in m for m in messages) == 1


def test_below_the_free_space_watermark_nothing_is_kept(tmp_path):
    pixels = np.zeros((64, 64), np.uint8)
    skipped: list[str] = []
    # A watermark above what the disk has free: the real filesystem says no.
    store = RetainedInputs(
        tmp_path,
        DiskBudget(min_free_bytes=free_bytes(tmp_path) + 2**40),
        on_skipped=skipped.append,
    )
    assert not store.keep("input00001", pixels)
    assert skipped == ["disk"]
    store.budget = DiskBudget(min_free_bytes=1)
    assert store.keep("input00002", pixels)
    assert [p.stem for p in store.pending.iterdir()] == ["input00002"]
