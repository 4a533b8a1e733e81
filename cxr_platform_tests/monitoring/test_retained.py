"""The labeled store keeps model inputs, never a path a client names."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from cxr_platform.monitoring.retained import RetainedInputs


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
