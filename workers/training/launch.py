"""The training child of a job with ``resources.processes`` N > 1: torchrun, with the runner's guarantees kept.

``python -m workers.training.launch N /path/spec.json`` runs exactly what ``torchrun --standalone
--nproc_per_node=N --max-restarts=0 -m workers.training spec.json`` runs (``torch.distributed.run``'s own
argument parser and ``run``), from a process that:

- is bound to the runner like a single-process child (lifeline pipe, parent-death signal), and passes the
  binding on: each rank gets this process's pid as its supervisor, so a rank dies with its launcher even
  though torchrun starts every rank in a session of its own (``kill -9`` of the launcher included);
- turns a rank killed by a signal nobody here sent (the OOM killer, ``kill -9`` of one rank) into exit
  :data:`~contract.resources.EXIT_RANK_LOST` with an ``event`` line, so the runner retries the attempt from
  the newest checkpoint as it does for a killed single-process child; a rank that failed (exit 1 after its
  ``error`` line, printed by rank 0 or in the log) exits 1;
- exits 143 when SIGTERM stopped it (a cancel, a pause): torchrun passes SIGTERM on to every rank, which stop
  at the same step boundary (the cancel check is collective, see ``distributed.py``).

Rank 0 alone writes protocol lines to the inherited stdout; the other ranks write theirs to the log.
"""

from __future__ import annotations

import os
import signal
import sys

from contract.protocol import ProgressWriter
from contract.resources import EXIT_RANK_LOST
from workers.training.lifeline import EXIT_SUPERVISOR_LOST, SUPERVISOR_PID_ENV, bind_to_supervisor

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 128 + 15
STAGE = "launch"


def torchrun_args(processes: int, spec_path: str) -> list[str]:
    # --standalone: a local c10d rendezvous on a free port; no restarts: a failed attempt is the runner's to
    # retry (from the newest checkpoint), not torchrun's (from step 0).
    return [
        "--standalone",
        f"--nproc_per_node={processes}",
        "--max_restarts=0",
        "--monitor_interval=0.2",
        "-m",
        "workers.training",
        spec_path,
    ]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def main(argv: list[str] | None = None) -> int:
    gone = bind_to_supervisor(os.environ)
    if gone is not None:
        print(f"alignd: {gone}; not training", file=sys.stderr, flush=True)
        return EXIT_SUPERVISOR_LOST
    # The protocol stream is this stdout, which the ranks inherit (rank 0 writes it); this process writes to it
    # only the lines below, after the ranks have ended. torchrun logs to stderr, the attempt's log.
    progress = ProgressWriter(sys.stdout)
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[0].isdigit() or int(args[0]) < 1:
        progress.error(
            "usage: python -m workers.training.launch PROCESSES /path/spec.json", code="invalid_spec"
        )
        return EXIT_USAGE
    processes, spec_path = int(args[0]), args[1]
    # Each rank is bound to this process (parent-death signal + pid check; no pipe: torchrun closes fds).
    os.environ[SUPERVISOR_PID_ENV] = str(os.getpid())
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(torchrun_args(processes, spec_path)))
    except SignalException as exc:
        print(f"alignd launcher: {exc}; the ranks were stopped", file=sys.stderr, flush=True)
        return EXIT_CANCELLED
    except ChildFailedError as exc:
        return _failed(progress, exc)
    return 0


def _failed(progress: ProgressWriter, exc: object) -> int:
    """The exit status for ranks that failed while this launcher was not asked to stop.

    A rank killed by a signal makes the attempt a crash (EXIT_RANK_LOST, retried from the newest checkpoint)
    even when the others failed first on their broken collectives, or were stopped by torchrun (SIGTERM):
    SIGTERM from us would have reached this process first, as a SignalException, not here.
    """
    failures = getattr(exc, "failures", {}) or {}
    killed = {rank: failure for rank, failure in failures.items() if failure.exitcode < 0}
    if killed:
        # The rank that was killed, not one torchrun stopped after it: a signal other than SIGTERM first.
        rank, failure = min(killed.items(), key=lambda item: (item[1].exitcode == -signal.SIGTERM, item[0]))
        progress.event(
            f"training rank {rank} (pid {failure.pid}) was killed by {_signal_name(-failure.exitcode)}; the "
            "other ranks were stopped",
            stage=STAGE,
            level="error",
        )
        return EXIT_RANK_LOST
    codes = sorted({failure.exitcode for failure in failures.values()})
    print(f"alignd launcher: ranks failed with exit codes {codes}", file=sys.stderr, flush=True)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
