"""Entry point of the training child: ``python -m workers.training /path/spec.json``.

Exit status: 0 when every artifact line has been written; 1 after an ``error`` line; 143 when SIGTERM
stopped training (at an optimizer-step boundary); 2 for a wrong command line; 3 when, at start, the
supervisor that spawned it is already gone. A child whose supervisor dies later is killed (lifeline.py).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from contract.protocol import ProgressWriter, TrainingSpec
    from workers.training.context import CancelToken
    from workers.training.distributed import Dist

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 128 + 15  # what a shell reports for SIGTERM; the parent knows it asked


def _claim_stdout() -> IO[str]:
    """Keep the real stdout for protocol lines and point fd 1 at stderr.

    Libraries (transformers, peft, tqdm) print to stdout at will; after this, anything written to fd 1, from
    Python or from C, lands on stderr, and only ProgressWriter writes to the protocol stream.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    os.dup2(2, 1)
    return proto


def _configure_threads() -> str | None:
    """Apply ALIGND_TORCH_THREADS; return a warning message for a value we could not use."""
    raw = os.environ.get("ALIGND_TORCH_THREADS")
    if not raw:
        return None
    try:
        threads = int(raw)
        if threads < 1:
            raise ValueError
    except ValueError:
        return f"ignoring ALIGND_TORCH_THREADS={raw!r}: not a positive integer"
    import torch

    torch.set_num_threads(threads)
    return None


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for us
        pass
    torch.manual_seed(seed)  # seeds CUDA devices too


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    # The CPU allocator raises a plain RuntimeError.
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _as_rank(
    spec: TrainingSpec, progress: ProgressWriter, proto: IO[str], dist: Dist, cancel: CancelToken
) -> tuple[TrainingSpec, ProgressWriter]:
    """One rank's view of the job under torchrun: rank 0 keeps the protocol stream, checkpoints and outputs;
    another rank (whose ``progress`` already writes to the log) writes no checkpoints and its outputs to a
    private folder that the runner never reads. The cancel check becomes collective."""
    cancel.sync = dist.any
    pids = dist.gather(os.getpid())
    if dist.is_main:
        progress.event(
            f"data parallel over {dist.world_size} processes ({dist.backend}; rank pids "
            f"{', '.join(map(str, pids))}): each takes its share of every batch, "
            + (
                "decoder layers sharded (fsdp), gradients reduce-scattered"
                if dist.sharded
                else "gradients all-reduced across processes"
            ),
            stage=spec.method,
        )
        return spec, progress
    proto.close()
    private = os.path.join(spec.output_dir, f".rank{dist.rank}")
    os.makedirs(private, exist_ok=True)
    return spec.model_copy(update={"output_dir": private, "checkpoint_dir": None}), progress


def main(argv: list[str] | None = None) -> int:
    from workers.training.lifeline import EXIT_SUPERVISOR_LOST, bind_to_supervisor

    # First, before any slow import: a child whose supervisor died must not start training.
    gone = bind_to_supervisor(os.environ)
    if gone is not None:  # nobody reads stdout any more: the log file is the only witness
        print(f"alignd: {gone}; not training", file=sys.stderr, flush=True)
        return EXIT_SUPERVISOR_LOST
    proto = _claim_stdout()
    # Every path in the spec is local; never let a library reach for the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from pydantic import ValidationError

    from contract.protocol import PAUSE_FLAG_FILE, ProgressWriter, TrainingSpec
    from workers.training import distributed
    from workers.training.context import CancelToken, RunContext
    from workers.training.distributed import SINGLE
    from workers.training.errors import (
        INTERNAL_ERROR,
        INVALID_SPEC,
        OUT_OF_MEMORY,
        Cancelled,
        TrainingError,
    )

    progress = ProgressWriter(proto)
    if os.environ.get("RANK", "0") not in ("", "0"):
        # Under torchrun rank 0 alone writes the protocol stream (distributed.py), from the first line on,
        # errors included; another rank's lines go to the log.
        progress = ProgressWriter(sys.stderr)
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        progress.error("usage: python -m workers.training /path/spec.json", code=INVALID_SPEC)
        return EXIT_USAGE

    cancel = CancelToken(pause_flag=Path(args[0]).with_name(PAUSE_FLAG_FILE))
    cancel.install()
    stage = "setup"
    dist = SINGLE
    try:
        try:
            spec = TrainingSpec.read(args[0])
        except (OSError, ValidationError, ValueError) as exc:
            raise TrainingError(INVALID_SPEC, f"cannot read training spec {args[0]}: {exc}") from exc
        stage = spec.method
        warning = _configure_threads()
        if warning:
            progress.event(warning, stage=stage, level="warning")
        dist = distributed.from_environment()
        if dist.enabled and spec.resources.strategy == "fsdp":
            dist = dataclasses.replace(dist, sharded=True)
        if dist.enabled:
            spec, progress = _as_rank(spec, progress, proto, dist, cancel)
        # The same seed on every rank: the replicas' adapters start equal; each rank's data is its share.
        seed_everything(spec.seed)

        from workers.training.registry import get_trainer

        trainer = get_trainer(spec.method)
        trainer(RunContext(spec=spec, progress=progress, cancel=cancel, dist=dist))
    except Cancelled:
        if cancel.pause_flagged:  # asked by a pause: the loop saved its checkpoint first; nothing went wrong
            progress.event("stopped for the pause", stage=stage)
        else:
            progress.event("received SIGTERM; stopped before finishing", stage=stage, level="warning")
        return EXIT_CANCELLED
    except TrainingError as exc:
        progress.error(exc.message, code=exc.code)
        return EXIT_FAILED
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        if _is_out_of_memory(exc):
            progress.error(f"out of memory: {exc}", code=OUT_OF_MEMORY)
        else:
            progress.error(f"{type(exc).__name__}: {exc}", code=INTERNAL_ERROR)
        return EXIT_FAILED
    finally:
        distributed.shutdown(dist)
        sys.stderr.flush()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
