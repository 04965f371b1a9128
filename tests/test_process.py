"""gptoss.runtimes.process: a call in a fresh process returns its result or raises its exception, and a process
killed from outside (as the kernel or a cluster's memory limit does) fails the caller at once, not a hang."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from gptoss.errors import GptOssError
from gptoss.runtimes.process import in_fresh_process


def add(a: int, b: int) -> int:
    return a + b


def fail() -> None:
    raise ValueError("raised in the child")


def killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_result_and_exception_come_back():
    assert in_fresh_process(add, 2, 3) == 5
    with pytest.raises(ValueError, match="raised in the child"):
        in_fresh_process(fail)


def test_a_killed_process_fails_the_caller_instead_of_hanging():
    outcome: dict[str, BaseException] = {}

    def call() -> None:
        try:
            in_fresh_process(killed)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "in_fresh_process still waits for a killed process"
    assert isinstance(outcome.get("error"), GptOssError) and "died without a result" in str(outcome["error"])
