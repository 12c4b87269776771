"""The training child dies with its supervisor, so no attempt of a job ever runs twice.

A supervisor (workers/supervise.py) that dies without stopping its child (SIGKILL, the OOM killer, a node
problem) would otherwise leave the child training, in its own process group, beside the attempt the job's
retry starts: both writing the same checkpoint folder. Three guards, each closing a gap the others leave:

- Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the child the moment the *thread* that forked it
  ends. The supervisor forks from one thread that lives as long as its process (``supervise._Spawner``),
  so "that thread ended" means "the supervisor process ended".
- ``getppid()`` right after: a supervisor that died between the fork and the prctl call sends no signal; the
  child then has a new parent and its supervisor's pid is gone, and it exits before doing anything.
- The lifeline pipe, portable: the supervisor keeps the write end, the child a thread blocked reading the read
  end. Nothing is ever written; end-of-file means every copy of the write end is closed, i.e. the supervisor
  is gone (or let the child go). The child then sends itself SIGTERM (what a cancel sends: the training loop
  stops at its next step boundary) and exits after a short grace whatever the loop does.

The supervisor passes its pid and the read end's fd number in the environment; a child started by hand (a
test, a benchmark) has neither and runs unguarded.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import MutableMapping

SUPERVISOR_PID_ENV = "ALIGND_SUPERVISOR_PID"
LIFELINE_FD_ENV = "ALIGND_LIFELINE_FD"

# Exit status after the supervisor was found gone (nobody is left to read it; it shows in `ps` and tests).
EXIT_SUPERVISOR_LOST = 3
# Time the training loop gets to stop at a step boundary once the lifeline broke, before the hard exit.
GRACE_SECONDS = 1.0

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent_thread() -> bool:
    """Ask Linux to SIGKILL this process when the thread that forked it ends. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):  # no libc symbol (a static or exotic build): the pipe still guards
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def supervisor_gone(supervisor_pid: int) -> bool:
    """Whether the supervisor that spawned us has already died (the fork-then-parent-died race).

    A parent other than the supervisor is not enough: ALIGND_TRAINING_PYTHON may be a wrapper script that
    runs Python without exec. The supervisor's pid must also be gone.
    """
    return os.getppid() != supervisor_pid and not _pid_alive(supervisor_pid)


def _exit_now() -> None:
    """Exit at once, taking any grandchildren along when we lead our own process group (we normally do)."""
    sys.stderr.flush()
    if os.getpgrp() == os.getpid():
        with contextlib.suppress(OSError):
            os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(EXIT_SUPERVISOR_LOST)


def watch_lifeline(fd: int, *, grace_seconds: float = GRACE_SECONDS) -> threading.Thread:
    """Start a daemon thread that blocks reading ``fd``; at end-of-file it sends this process SIGTERM (before
    the child installs its cancel handler that simply ends it), waits ``grace_seconds`` and exits."""

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 512):  # the supervisor never writes; anything read is ignored
                pass
        print("alignd: the supervisor is gone; stopping this training process", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(grace_seconds)
        _exit_now()

    thread = threading.Thread(target=watch, name="alignd-lifeline", daemon=True)
    thread.start()
    return thread


def bind_to_supervisor(environ: MutableMapping[str, str]) -> str | None:
    """Tie this process's life to the supervisor named in ``environ`` (see the module docstring).

    Returns a message when the supervisor is already gone (the caller exits), else None. The two variables
    are removed from ``environ`` so that processes this child starts do not inherit them.
    """
    raw_pid = environ.pop(SUPERVISOR_PID_ENV, None)
    raw_fd = environ.pop(LIFELINE_FD_ENV, None)
    if raw_pid is None and raw_fd is None:
        return None
    die_with_parent_thread()
    if raw_pid is not None and raw_pid.isdigit() and supervisor_gone(int(raw_pid)):
        return f"the supervisor (pid {raw_pid}) died before this training process started"
    if raw_fd is not None and raw_fd.isdigit():
        watch_lifeline(int(raw_fd))
    return None
