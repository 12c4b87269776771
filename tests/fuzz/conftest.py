"""The fuzz figures: printed after the run, and written to ``$ALIGND_FUZZ_RESULTS.json`` / ``.md`` when set
(``make fuzz`` sets ``bench/results/fuzz``), with the machine described (CPU, cores, load averages)."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fuzz.budget import API_CASES, FUZZING, INPUTS_PER_TARGET, PROFILE, TARGETS

REPO = Path(__file__).resolve().parents[2]
_STARTED = time.monotonic()
_STARTED_AT = time.strftime("%Y-%m-%dT%H:%M:%S%z")
_LOAD_AT_START = [
    round(x, 2) for x in os.getloadavg()
]  # the stamp is taken at the end; the load now is what ran


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        for figures in TARGETS.values():
            if report.nodeid in figures.nodeids:
                figures.failed = True


def _bench_common() -> Any:
    # bench/ is scripts, not a package: load its shared writer (machine stamp, JSON + Markdown) by path.
    spec = importlib.util.spec_from_file_location("bench_common", REPO / "bench" / "common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _summary() -> dict[str, Any]:
    rows = [figures.row() for figures in TARGETS.values()]
    return {
        "profile": PROFILE,
        "inputs_per_target_asked": INPUTS_PER_TARGET if FUZZING else None,
        "api_cases_per_operation": API_CASES,
        "wall_seconds": round(time.monotonic() - _STARTED, 1),
        "inputs": sum(r["inputs"] for r in rows),
        "failed_targets": sum(1 for r in rows if r["failed"]),
        "crashing_inputs": sum(r["crashing_inputs"] for r in rows),
        "server_errors_5xx": sum(r["server_errors_5xx"] for r in rows),
        "schema_violations": sum(r["schema_violations"] for r in rows),
        "rows": rows,
        "notes": [note for figures in TARGETS.values() for note in figures.notes],
    }


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TARGETS:
        return
    summary = _summary()
    write = terminalreporter.write_line
    terminalreporter.section("fuzz figures")
    for row in summary["rows"]:
        write(
            f"{row['target']:<44} inputs {row['inputs']:>8}  crashing {row['crashing_inputs']:>3}  "
            f"5xx {row['server_errors_5xx']:>3}  schema {row['schema_violations']:>3}  "
            f"{'FAILED' if row['failed'] else 'ok':<6} {row['seconds']:>7.1f}s"
        )
    write(
        f"total: {summary['inputs']} inputs, {summary['failed_targets']} failed targets, "
        f"{summary['crashing_inputs']} crashing inputs, {summary['server_errors_5xx']} 5xx, "
        f"{summary['schema_violations']} schema violations, {summary['wall_seconds']} s"
    )
    results = os.environ.get("ALIGND_FUZZ_RESULTS")
    if results:
        common = _bench_common()
        out = REPO / results
        rows = summary.pop("rows")
        json_path, md_path = common.write_results(
            out.name,
            title="Fuzzing: validator, model checks, archive extraction, API (make fuzz)",
            stamp={
                **common.machine_stamp(["hypothesis", "schemathesis"]),
                "loadavg": _LOAD_AT_START,
                "time": _STARTED_AT,
            },
            tables={"Targets": rows},
            data={"summary": summary, "nproc": os.cpu_count()},
            notes=[
                f"profile {PROFILE}: {summary['inputs_per_target_asked']} inputs asked per property target, "
                f"{API_CASES} schemathesis cases per API operation and backend",
                f"wall time {summary['wall_seconds']} s for the whole run",
                *summary["notes"],
            ],
            out_dir=out.parent,
        )
        write(f"figures written to {json_path} and {md_path}")
