"""Stopping a sweep: the first Ctrl-C or SIGTERM stops it within seconds, whatever it is doing; a second aborts.

A sweep spends its time in two kinds of code. A few loops check a stop event themselves and wind
down by keeping what they did: the trainer's step loop saves a checkpoint, an executor's driver
loop tells its workers to and collects their outcomes. Inside such a loop (:func:`deferred`) a first
signal only sets the event. Everywhere else (decoding a dataset, building a model, starting workers,
connecting to a cluster) there is nothing to keep and waiting could take minutes, so a first signal
raises :class:`StopRequested` in the main thread at once. That is safe because every file a sweep
writes is written whole or not at all (see ``storage``), and a run that has not reached its step
loop resumes from its last checkpoint. A second signal raises KeyboardInterrupt wherever the sweep is.

Both derive from KeyboardInterrupt, so ``except Exception`` never records a stop as a failed run.
Signals are process-wide and Python runs their handlers in the main thread, so the state here is
process-wide too. Worker processes ignore the signals themselves and take their stop from the
driver (:func:`stop_on`). This module imports no torch: workers use it before importing torch.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import threading
from multiprocessing import resource_tracker
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(KeyboardInterrupt):
    """A first Ctrl-C or SIGTERM, raised where nothing checks for it; what was saved stays resumable."""


_stop = threading.Event()  # set by the first stop signal of the outermost `stop_signals` block
_received = 0  # stop signals received since that block began
_handling = 0  # depth of nested `stop_signals` blocks
_deferred = 0  # depth of `deferred` blocks the main thread is in


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _on_signal(signum: int, frame: Any) -> None:
    global _received
    _received += 1
    if _received > 1:  # counted, not read from the event: a second handler may interrupt the first one's set()
        raise KeyboardInterrupt  # a second signal: abort now, without waiting for checkpoints
    _stop.set()
    if not _deferred:
        raise StopRequested(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_signals() -> Iterator[threading.Event]:
    """Within the block, Ctrl-C and SIGTERM stop the sweep as the module says; yields the event a first one sets.

    Nested blocks share the outermost one's handlers and event; the previous handlers come back
    when it ends. A library may turn StopRequested into a plain KeyboardInterrupt (``ray.wait`` does):
    after one signal, what leaves the block is StopRequested again, so the caller can tell a clean stop
    from an abort by the type alone. Python can only install handlers from the main thread: elsewhere
    this yields a fresh event that nothing sets.
    """
    global _handling, _received
    if not _in_main_thread():
        yield threading.Event()
        return
    if _handling:
        _handling += 1
        try:
            yield _stop
        finally:
            _handling -= 1
        return
    _stop.clear()
    _received = 0
    previous = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}
    _handling = 1
    try:
        yield _stop
    except KeyboardInterrupt as err:
        if _received == 1 and not isinstance(err, StopRequested):
            raise StopRequested("stop signal") from err
        raise
    finally:
        _handling = 0
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Mark a block that checks the stop event itself: inside it a first stop signal only sets the event.

    The block, or its caller right after it, must then wind down soon. Only the main thread's blocks
    count, since only the main thread runs signal handlers.
    """
    global _deferred
    if not _in_main_thread():
        yield
        return
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1


@contextlib.contextmanager
def workers_born_deaf() -> Iterator[None]:
    """Processes started in this block are deaf to Ctrl-C and SIGTERM from their first instruction.

    A Ctrl-C reaches every process of the terminal's group; a worker must leave the decision to its
    driver, and a spawned one takes seconds to import torch before its initializer could ignore the
    signals. A blocked signal stays blocked across fork and exec, so the main thread blocks them while
    the workers start: they are born with the signals blocked (pending, harmless) and ignore them in
    their initializer (:func:`ignore_stop_signals`), which discards what is pending. Nothing changes
    for this process's handlers: a signal meanwhile reaches them through another thread at once, or
    through this one when the block ends, never lost.
    """
    if not hasattr(signal, "pthread_sigmask") or not _in_main_thread():
        yield
        return
    # multiprocessing starts its tracker process on first need and then unblocks these very signals.
    resource_tracker.ensure_running()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def ignore_stop_signals() -> None:
    """First thing in a worker started by :func:`workers_born_deaf`: ignore the stop signals from now on."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_on(event: Any, poll_s: float = 0.1) -> Iterator[None]:
    """In a worker that ignores the stop signals: once ``event`` is set (by the driver), stop as a first signal would.

    ``event`` is anything with ``is_set()``, such as a multiprocessing.Event. Inside :func:`deferred` the
    block checks ``event`` itself; anywhere else StopRequested is raised in the main thread at once, so a
    worker loading data or building a model does not keep its driver waiting. A thread polls ``event``
    and then interrupts the main thread through SIGINT's handler (``_thread.interrupt_main`` sends no
    signal), which this block points at its own; a Ctrl-C from the terminal that reaches the worker
    before the driver decided changes nothing.

    The handler reads only a flag of this process: a multiprocessing.Event takes a lock shared with the
    driver, which a handler interrupting its own holder would never get. For the same reason the thread
    polls rather than waits: a waiter that dies (a worker killed by the OS) would hang the driver's ``set()``.
    """
    if not _in_main_thread():
        yield
        return
    armed = True
    seen = threading.Event()  # the driver's event, as the watcher last saw it

    def on_interrupt(signum: int, frame: Any) -> None:
        if armed and seen.is_set() and not _deferred:
            raise StopRequested("stopped by the driver")

    def watch() -> None:
        while not done.wait(poll_s):
            if event.is_set():
                seen.set()
                _thread.interrupt_main(signal.SIGINT)
                return

    done = threading.Event()
    previous = signal.signal(signal.SIGINT, on_interrupt)
    watcher = threading.Thread(target=watch, name="stop watcher", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        armed = False
        done.set()
        watcher.join()
        signal.signal(signal.SIGINT, previous)
