"""Process-parallel map with a progress bar, for decode-bound work over many images."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import TypeVar

from tqdm.auto import tqdm

from cxr_platform.terminal import progress_stream

T = TypeVar("T")
R = TypeVar("R")

# Below this many items a pool costs more to start than it saves.
_MIN_ITEMS_FOR_POOL = 64


def parallel_map(
    function: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: int,
    description: str,
    progress: bool = True,
    chunksize: int = 32,
    backend: str = "thread",
) -> list[R]:
    """``[function(item) for item in items]`` in parallel, order preserved.

    Threads are the default: Pillow's decoders, resizing and hashlib release the GIL, and on
    small images (the 224x224 Kaggle copy) process start-up costs more than it saves (see
    benchmarks/data_pipeline.py). ``backend="process"`` suits large, decode-heavy files; its
    workers start with ``forkserver`` because the caller may be threaded (Dagster, a web server)
    where ``fork`` can deadlock, and ``function`` must then be a module-level function.
    """
    bar = tqdm(
        total=len(items),
        desc=description,
        unit="img",
        disable=not progress,
        leave=False,
        file=progress_stream(),
    )
    try:
        if workers <= 1 or len(items) < _MIN_ITEMS_FOR_POOL:
            return list(_with_progress(map(function, items), bar))
        if backend == "thread":
            with ThreadPoolExecutor(max_workers=workers) as pool:
                return list(_with_progress(pool.map(function, items), bar))
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            return list(_with_progress(pool.map(function, items, chunksize=chunksize), bar))
    finally:
        bar.close()


def _with_progress(results: Iterable[R], bar: tqdm) -> Iterable[R]:
    for result in results:
        bar.update(1)
        yield result
