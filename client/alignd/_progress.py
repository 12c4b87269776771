"""A one-line live progress display on stderr, with no dependency.

On a terminal the line is redrawn in place; elsewhere (CI logs, pipes) a new line is printed only when
its content changes, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from alignd.types import Job, MetricList

BAR_WIDTH = 20
# Which metric to show, in order of preference, per kind.
LOSS_NAMES = ("loss", "train_loss", "sft_loss", "dpo_loss")
REWARD_NAMES = ("reward", "reward_mean", "mean_reward", "rewards/mean", "accuracy")


def _latest_of(metrics: MetricList, names: tuple[str, ...], stage: str | None) -> tuple[str, float] | None:
    for name in names:
        row = metrics.latest(name, stage=stage) or metrics.latest(name)
        if row is not None and row.value is not None:
            return name, row.value
    return None


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_progress(job: Job, metrics: MetricList | None = None, *, elapsed: float | None = None) -> str:
    fraction = min(1.0, max(0.0, job.progress or 0.0))
    filled = round(fraction * BAR_WIDTH)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    parts = [job.id, job.status]
    if job.stage:
        parts.append(f"stage {job.stage}")
    parts.append(f"[{bar}] {fraction * 100:5.1f}%")
    if metrics:
        stage_rows = [m for m in metrics if job.stage is None or m.stage in (None, job.stage)]
        last = stage_rows[-1] if stage_rows else metrics[-1]
        if last.step is not None:
            parts.append(f"step {last.step:g}" if isinstance(last.step, float) else f"step {last.step}")
        for names in (LOSS_NAMES, REWARD_NAMES):
            found = _latest_of(metrics, names, job.stage)
            if found is not None:
                parts.append(f"{found[0]} {found[1]:.4g}")
    if elapsed is not None:
        parts.append(_elapsed(elapsed))
    return "  ".join(parts)


class ProgressLine:
    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._last = ""
        self._width = 0
        self._started = time.monotonic()

    def update(self, job: Job, metrics: MetricList | None = None) -> None:
        text = format_progress(job, metrics, elapsed=time.monotonic() - self._started)
        if self._tty:
            pad = max(0, self._width - len(text))
            self._stream.write("\r" + text + " " * pad)
            self._width = len(text)
            self._stream.flush()
        else:
            # Skip the elapsed-time suffix when deciding whether anything changed.
            key = format_progress(job, metrics)
            if key != self._last:
                self._stream.write(text + "\n")
                self._stream.flush()
                self._last = key

    def close(self) -> None:
        if self._tty and self._width:
            self._stream.write("\n")
            self._stream.flush()
            self._width = 0
