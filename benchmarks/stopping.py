"""Stopping a long command cleanly: SIGTERM (a cluster's time limit, ``kill``)
and Ctrl-C end in one line and a known exit status, at any moment, and a stop
that third-party code swallowed still ends the run at the next safe point."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Callable, Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM: stop like Ctrl-C, with a message."""


class _Requests:
    signal: int = 0  # the last stop signal received (0: none)


def _on_signal(signum, frame):
    _Requests.signal = signum
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def exit_during_start_up(prog: str) -> None:
    """Before a command's heavy imports: SIGTERM or Ctrl-C end the process at
    once with one line and 143 / 130 (nothing can be lost yet). Its
    :func:`stop_handlers` replace these when the command starts."""

    def leave(signum, frame):
        how = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
        sys.stderr.write(f"{prog}: {how} during start-up; nothing was trained\n")
        sys.stderr.flush()
        os._exit(143 if signum == signal.SIGTERM else 130)

    leave.start_up = True
    for s in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(s, leave)


@contextlib.contextmanager
def stop_handlers() -> Iterator[None]:
    """SIGTERM and SIGINT handlers that record the request and raise; a
    caller's own handlers are left alone. Installed before anything else runs."""
    _Requests.signal = 0
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s, handler in previous.items():
        if handler in (signal.SIG_DFL, signal.default_int_handler) or getattr(handler, "start_up", False):
            signal.signal(s, _on_signal)
    try:
        yield
    finally:
        _Requests.signal = 0  # handled: the next command starts clean
        for s, handler in previous.items():
            signal.signal(s, handler)


def check_stop() -> None:
    """At a safe point (between experiences, between runs): raise again a stop
    that was requested but swallowed on its way up."""
    if _Requests.signal:
        raise Terminated() if _Requests.signal == signal.SIGTERM else KeyboardInterrupt()


def exit_status(stop: KeyboardInterrupt) -> int:
    return 143 if isinstance(stop, Terminated) else 130


def run_stoppable(prog: str, body: Callable[[], int]) -> int:
    """``body()`` under :func:`stop_handlers`; a stop that reaches here (start-up,
    data loading, the final write) prints one line and returns 143 or 130."""
    with stop_handlers():
        try:
            return body()
        except KeyboardInterrupt as stop:
            how = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
            print(f"{prog}: {how} before any run finished or while writing; nothing was lost that a checkpoint held",
                  file=sys.stderr)
            return exit_status(stop)
