"""What one worker can run at once: training processes on a CPU worker, GPUs on a GPU worker.

A job takes ``resources.processes`` of them for its whole run (contract/resources.py); a job that does not
fit in what is free is not taken: it stays ``queued`` with a ``waiting_for_capacity`` event and the
reconciler hands it out again (to this worker once a job ends, or to a larger one). The advertised figures
come from ``ALIGND_WORKER_GPUS`` (each process one GPU, named to the child through CUDA_VISIBLE_DEVICES) or
``ALIGND_WORKER_PROCESSES`` (CPU processes; unset: the CPU count, and never fewer than
``ALIGND_WORKER_CONCURRENCY``, so single-process jobs run as many at once as before).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from service.settings import Settings

WAITING_FOR_CAPACITY = "waiting_for_capacity"


@dataclass(frozen=True)
class Reservation:
    processes: int
    gpus: tuple[int, ...] = ()  # device indices on a GPU worker, empty on a CPU worker

    def child_env(self) -> dict[str, str]:
        """What the training child needs to see only its own GPUs."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, self.gpus))} if self.gpus else {}


class Capacity:
    def __init__(self, *, processes: int, gpus: int = 0) -> None:
        self.gpus = gpus
        self.total = gpus if gpus > 0 else processes
        self._used = 0
        self._free_gpus = list(range(gpus))
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Capacity:
        processes = settings.worker_processes or max(os.cpu_count() or 1, settings.worker_concurrency)
        return cls(processes=processes, gpus=settings.worker_gpus)

    @property
    def unit(self) -> str:
        return "GPUs" if self.gpus else "training processes"

    def reserve(self, processes: int) -> Reservation | None:
        """Take ``processes`` for one job, or None when fewer are free."""
        with self._lock:
            if self._used + processes > self.total:
                return None
            self._used += processes
            taken = tuple(self._free_gpus[:processes]) if self.gpus else ()
            del self._free_gpus[: len(taken)]
            return Reservation(processes, taken)

    def release(self, reservation: Reservation) -> None:
        with self._lock:
            self._used -= reservation.processes
            self._free_gpus = sorted([*self._free_gpus, *reservation.gpus])

    def waiting_message(self, processes: int, worker_id: str) -> str:
        with self._lock:
            free = self.total - self._used
        where = (
            f"worker {worker_id} has {self.total} {self.unit}"
            if processes > self.total
            else f"worker {worker_id} has {free} of its {self.total} {self.unit} free"
        )
        return f"{WAITING_FOR_CAPACITY}: the job needs {processes} {self.unit}; {where}. It stays queued."
