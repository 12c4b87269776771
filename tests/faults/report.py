"""The fault suite's figures: printed by each test, and written to ``bench/results/faults.json`` + ``.md`` when
``ALIGND_FAULTS_RESULTS`` names the results folder (``make faults`` sets it; the short slice in ``make test``
does not, so it never overwrites the full run's file)."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _bench_common() -> ModuleType:
    """bench/common.py (stdlib only): the machine stamp and results writer every benchmark uses."""
    spec = importlib.util.spec_from_file_location("alignd_bench_common", REPO / "bench" / "common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class FaultResults:
    def __init__(self, out_dir: Path | None) -> None:
        self.out_dir = out_dir
        self.started = time.monotonic()
        self.stamp: dict[str, Any] = _bench_common().machine_stamp() if out_dir else {}
        self.sections: dict[str, dict[str, Any]] = {}

    @classmethod
    def from_env(cls) -> FaultResults:
        value = os.environ.get("ALIGND_FAULTS_RESULTS")
        return cls(
            REPO / value if value and not Path(value).is_absolute() else Path(value) if value else None
        )

    def add(
        self, name: str, *, targets: dict[str, Any], figures: dict[str, Any], notes: list[str] | None = None
    ) -> None:
        self.sections[name] = {"targets": targets, "figures": figures, "notes": notes or []}
        print(f"\n[faults] {name}: targets {targets}")
        print(f"[faults] {name}: figures {figures}")
        for note in notes or []:
            print(f"[faults] {name}: {note}")

    def write(self) -> tuple[Path, Path] | None:
        if self.out_dir is None or not self.sections:
            return None
        common = _bench_common()
        rows = []
        for name, section in self.sections.items():
            for key, value in section["figures"].items():
                target = section["targets"].get(key, "")
                rows.append({"scenario": name, "figure": key, "value": value, "target": target})
        wall = round(time.monotonic() - self.started)
        notes = [f"Wall time of the whole run: {wall} s; nproc {os.cpu_count()}."]
        notes += [f"{name}: {note}" for name, section in self.sections.items() for note in section["notes"]]
        return common.write_results(
            "faults",
            title="Fault injection (`make faults`)",
            stamp={**self.stamp, "nproc": os.cpu_count(), "wall_s": wall},
            tables={"Figures against their targets": rows},
            data={"scenarios": self.sections},
            notes=notes,
            out_dir=self.out_dir,
        )
