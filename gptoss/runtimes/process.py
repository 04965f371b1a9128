"""One call in a process of its own, so that what a runtime keeps after a run goes back to the system."""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from gptoss.errors import GptOssError

T = TypeVar("T")


def in_fresh_process(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a new process (spawned, so it shares nothing); its result, or its exception, returned here.
    A process that dies without returning (killed for memory by the kernel or a cluster's limit) fails here at
    once, rather than leaving this one waiting."""
    context = multiprocessing.get_context("spawn")
    level = logging.getLogger("gptoss").level
    with ProcessPoolExecutor(1, mp_context=context, initializer=_child_logging, initargs=(level,)) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            name = getattr(fn, "__name__", str(fn))
            raise GptOssError(
                f"the process running {name} died without a result (killed: out of memory, or a signal); "
                "see the kernel log (dmesg) or the job's memory limit"
            ) from None


def _child_logging(level: int) -> None:
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("gptoss").setLevel(level)
