"""What every method trainer receives: the spec, the progress writer and the cancellation token."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from contract.protocol import ProgressWriter, TrainingSpec
from workers.training.distributed import Dist
from workers.training.errors import Cancelled


class CancelToken:
    """Turns SIGTERM into a clean stop.

    Outside :meth:`deferred` (loading the model, tokenising) the signal raises :class:`Cancelled` at once:
    nothing is half-done that would be worth finishing. Inside it (the training loop) the signal only sets a
    flag, and the loop calls :meth:`check` at each optimizer-step boundary, so a step is never cut in half.
    The parent decides that the job is cancelled; the child only stops and exits 143 (128 + SIGTERM).
    """

    def __init__(self, pause_flag: Path | None = None) -> None:
        self._requested = False
        self._deferred = 0
        # Under torchrun: combines every rank's flag (Dist.any), so all ranks stop after the same step.
        self.sync: Callable[[bool], bool] | None = None
        # The runner leaves this file before the SIGTERM of a pause (contract.protocol.PAUSE_FLAG_FILE).
        self._pause_flag = pause_flag

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._requested = True
        if not self._deferred:
            raise Cancelled()

    def request(self) -> None:
        """Ask for a stop without a signal (tests, or a trainer that gives up)."""
        self._requested = True

    @property
    def requested(self) -> bool:
        return self._requested

    @property
    def pause_flagged(self) -> bool:
        """The runner left the pause flag: this rank's own view, no collective (safe on any code path)."""
        return self._pause_flag is not None and self._pause_flag.exists()

    def stop_requested(self) -> bool:
        """Whether a stop was asked for: under torchrun on any rank (a collective; every rank calls it at the
        same points, the loop's step boundaries). One reading decides both whether to stop and, with
        :attr:`pause_flagged`, whether to save first: two readings could straddle the signal and stop
        without the pause's checkpoint."""
        requested = self._requested if self.sync is None else self.sync(self._requested)
        self._requested = requested
        return requested

    def check(self) -> None:
        """Raise Cancelled if a stop was asked for (under torchrun: on any rank; every rank must call it at the
        same points, which the loop's step boundaries are)."""
        requested = self._requested if self.sync is None else self.sync(self._requested)
        if requested:
            self._requested = True
            raise Cancelled()

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self.check()
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1


@dataclass
class RunContext:
    spec: TrainingSpec
    progress: ProgressWriter
    cancel: CancelToken = field(default_factory=CancelToken)
    # This process's rank under torchrun (workers/training/distributed.py); a world of one otherwise.
    dist: Dist = field(default_factory=Dist)
