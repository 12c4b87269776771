"""What every method trainer receives: the spec, the progress writer and the cancellation token."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from contract.protocol import ProgressWriter, TrainingSpec
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
    def pausing(self) -> bool:
        """A stop was asked for by a pause: the loop saves a checkpoint of the finished step before stopping."""
        return self._requested and self._pause_flag is not None and self._pause_flag.exists()

    def check(self) -> None:
        if self._requested:
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
