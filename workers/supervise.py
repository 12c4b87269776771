"""The training child: spawned in its own process group, its stdout relayed line by line, stopped on demand.

The child is ``python -m workers.training spec.json`` (see contract/protocol.py); its stderr goes to a log
file in the attempt folder, whose tail explains a crash. A stop (cancel, abort, worker shutdown) is SIGTERM
to the whole group; a child that outlives the grace period after a cancel or abort gets SIGKILL.

The child never outlives this process (workers/training/lifeline.py): it is forked from one long-lived
thread (PR_SET_PDEATHSIG follows the forking thread, not the process) and holds the read end of a lifeline
pipe whose write end only this process has, so its end-of-file means the supervisor is gone.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.protocol import parse_line
from service.settings import Settings
from workers.lease import Lease, LeaseLost
from workers.training.lifeline import LIFELINE_FD_ENV, SUPERVISOR_PID_ENV

Error = tuple[str, str]  # (code, message)


def child_command(settings: Settings, spec_path: Path, *, processes: int = 1) -> list[str]:
    """One process, or the torchrun launcher (workers/training/launch.py) for ``processes`` > 1."""
    python = settings.training_python or sys.executable
    if processes > 1:
        return [python, "-m", "workers.training.launch", str(processes), str(spec_path)]
    return [python, "-m", "workers.training", str(spec_path)]


def child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if settings.torch_threads:
        env["ALIGND_TORCH_THREADS"] = str(settings.torch_threads)
    # The child must import the same `workers` package as this process, installed or not.
    project_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [project_root, env.get("PYTHONPATH")]))
    return env


_Start = Callable[[], "subprocess.Popen[str]"]


class _Spawner:
    """One daemon thread that forks every child and lives as long as the process.

    The child's PR_SET_PDEATHSIG fires when the thread that forked it ends. A runner thread (arq's executor,
    an inline queue thread) could end while its child runs on; this one ends only with the process.
    """

    def __init__(self) -> None:
        self._requests: queue.Queue[tuple[_Start, Future[subprocess.Popen[str]]]] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def spawn(self, start: _Start) -> subprocess.Popen[str]:
        """Run ``start`` (a Popen call) on the spawner thread and return its child (or raise its error)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="alignd-spawner", daemon=True)
                self._thread.start()
        done: Future[subprocess.Popen[str]] = Future()
        self._requests.put((start, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            start, done = self._requests.get()
            try:
                done.set_result(start())
            except BaseException as exc:  # handed to the caller, who raises it in its own thread
                done.set_exception(exc)


_spawner = _Spawner()


class Children:
    """The training children running now, so a worker that stops can stop them all."""

    def __init__(self) -> None:
        self._children: dict[subprocess.Popen[str], int] = {}  # child -> write end of its lifeline
        self._lock = threading.Lock()

    def spawn(
        self, command: list[str], *, env: dict[str, str], cwd: Path, log_path: Path
    ) -> subprocess.Popen[str]:
        # Nothing is ever written to the lifeline; the child watches for its end-of-file. os.pipe() fds are
        # not inherited, so only this child gets the read end and no other child holds the write end.
        lifeline_read, lifeline_write = os.pipe()
        env = {**env, SUPERVISOR_PID_ENV: str(os.getpid()), LIFELINE_FD_ENV: str(lifeline_read)}
        try:
            with open(log_path, "w", encoding="utf-8") as log_file:
                child = _spawner.spawn(
                    lambda: subprocess.Popen(
                        command,
                        stdout=subprocess.PIPE,
                        stderr=log_file,
                        text=True,
                        env=env,
                        cwd=cwd,
                        pass_fds=(lifeline_read,),
                        start_new_session=True,  # its own process group: cancel reaches grandchildren too
                    )
                )
        except BaseException:
            os.close(lifeline_write)
            raise
        finally:
            os.close(lifeline_read)
        with self._lock:
            self._children[child] = lifeline_write
        return child

    def reap(self, child: subprocess.Popen[str]) -> None:
        """Forget ``child``, killing its group first if it still runs (the relay ended early)."""
        with self._lock:
            lifeline_write = self._children.pop(child, None)
        if child.poll() is None:
            signal_group(child, signal.SIGKILL)
            child.wait()
        if lifeline_write is not None:
            os.close(lifeline_write)

    def terminate_all(self) -> None:
        with self._lock:
            children = list(self._children)
        for child in children:
            signal_group(child, signal.SIGTERM)


@dataclass(frozen=True)
class ChildExit:
    """How an attempt's child ended, for the runner to turn into the job's status."""

    returncode: int
    error: Error | None  # the last error line the child printed
    abort: Error | None  # the runner's abort of this job, if one was asked for
    cancelled: bool  # a cancel was requested and the child was told to stop
    paused: bool = False  # a pause (and no cancel or abort) was requested and the child was told to stop


@dataclass(frozen=True)
class StopRequests:
    """What the relay loop checks between lines; each one stops the child."""

    abort: Callable[[], Error | None]  # the runner's abort of this job (e.g. the arq job timeout)
    stopping: threading.Event  # the worker is shutting down
    cancel_grace_seconds: float
    # Called before the child is told to stop for a pause: leaves the flag the child reads to save a
    # checkpoint before it exits (contract.protocol.PAUSE_FLAG_FILE next to its spec).
    mark_pause: Callable[[], None] = lambda: None


def _lines_of(child: subprocess.Popen[str], name: str) -> queue.Queue[str | None]:
    """The child's stdout lines, read by a thread of their own; None after the last one."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, name=name, daemon=True).start()
    return lines


def relay(
    child: subprocess.Popen[str],
    lease: Lease,
    *,
    handle: Callable[[dict[str, Any]], None],
    announce: Callable[[str, str], None],
    stops: StopRequests,
) -> ChildExit:
    """Hand each protocol message to ``handle`` until the child's stdout ends, stopping it when asked.

    ``announce(message, level)`` records why the child is being stopped. Raises LeaseLost as soon as the
    lease keeper has lost the lease (the caller kills the child on the way out).
    """
    lines = _lines_of(child, f"relay-{lease.job_id}")
    error: Error | None = None
    abort_error: Error | None = None
    cancel_sent_at: float | None = None
    pause_sent_at: float | None = None
    stop_sent = False
    eof = False
    while not eof:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            line = ""
        if line is None:
            eof = True
        elif line:
            message = parse_line(line)
            if message is not None:
                if message["type"] == "error":
                    error = (str(message.get("code", "training_error")), str(message.get("message", "")))
                handle(message)
        if lease.lost.is_set():
            raise LeaseLost(lease.job_id)
        if abort_error is None and (abort_error := stops.abort()) is not None:
            announce(f"{abort_error[1]} Stopping the training process.", "error")
            signal_group(child, signal.SIGTERM)
            cancel_sent_at = time.monotonic()
        if lease.cancel_requested.is_set() and cancel_sent_at is None:
            announce("Cancel requested: stopping the training process.", "warning")
            signal_group(child, signal.SIGTERM)
            cancel_sent_at = time.monotonic()
        if lease.pause_requested.is_set() and cancel_sent_at is None:
            stops.mark_pause()
            announce("Pause requested: stopping the training process after a checkpoint.", "info")
            signal_group(child, signal.SIGTERM)
            cancel_sent_at = pause_sent_at = time.monotonic()
        if stops.stopping.is_set() and not stop_sent:
            signal_group(child, signal.SIGTERM)
            stop_sent = True
        if cancel_sent_at is not None and time.monotonic() - cancel_sent_at > stops.cancel_grace_seconds:
            signal_group(child, signal.SIGKILL)
    returncode = child.wait()
    # An abort raised while handling the last lines (a rejected generated dataset) lands after EOF.
    abort_error = abort_error or stops.abort()
    return ChildExit(
        returncode=returncode,
        error=error,
        abort=abort_error,
        cancelled=cancel_sent_at is not None and abort_error is None and pause_sent_at is None,
        paused=pause_sent_at is not None and abort_error is None,
    )


def signal_group(child: subprocess.Popen[str], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, sig)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def tail(path: Path, count: int) -> str:
    """The last ``count`` lines of the child's log (empty when it cannot be read)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=count)).strip()
    except OSError:
        return ""
