"""One call in a process of its own, so that what a runtime keeps after a run goes back to the system."""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_fresh_process(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a new process (spawned, so it shares nothing); its result, or its exception, returned here."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, initializer=_child_logging, initargs=(logging.getLogger("gptoss").level,)) as pool:
        return pool.apply(fn, args)


def _child_logging(level: int) -> None:
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("gptoss").setLevel(level)
