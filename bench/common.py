"""Shared pieces of the benchmarks: machine stamp, load averages, peak RSS of a child process tree, the fp32
matmul peak, and the JSON + Markdown writers for ``bench/results/``.

Everything here is stdlib (plus torch only inside :func:`matmul_peak_gflops`), so the harness runs in the main
venv and in the benchmark venv (``.venv-bench``) alike. Peak RSS is read from ``/proc`` (no psutil).

A figure taken while other work runs on the machine is a figure about that other work too: every measurement
records :func:`loadavg` before and after it, and the writers put those numbers next to the figures.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WORK = REPO / "bench" / ".work"  # gitignored scratch space (generated data, models)
PAGE = os.sysconf("SC_PAGE_SIZE")

# Words for generated text (datasets of realistic, varied lines); shared so every benchmark's data is alike.
WORDS = [
    "the",
    "model",
    "answer",
    "question",
    "because",
    "which",
    "would",
    "could",
    "should",
    "explain",
    "step",
    "first",
    "then",
    "finally",
    "result",
    "data",
    "value",
    "function",
    "return",
    "error",
    "example",
    "python",
    "code",
    "list",
    "number",
    "people",
    "time",
    "year",
    "work",
    "world",
    "however",
    "therefore",
    "although",
    "consider",
    "important",
    "different",
    "possible",
    "between",
    "without",
    "during",
]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def _versions(packages: Sequence[str]) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_stamp(extra_packages: Sequence[str] = ()) -> dict[str, Any]:
    """CPU model, cores, RAM, GPU (when torch sees one), library versions and the load averages now."""
    stamp: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": _ram_gib(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "gpu": None,
        "versions": _versions(["torch", "transformers", "peft", "trl", *extra_packages]),
        "loadavg": loadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import torch

        if torch.cuda.is_available():
            stamp["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return stamp


# --- peak RSS of a process tree, from /proc


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        for task in task_dir.iterdir():
            try:
                kids.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
    except OSError:
        pass
    return kids


def _rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss_bytes(pid: int) -> int:
    """Current RSS summed over ``pid`` and all its descendants (shared pages counted in each)."""
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _rss_bytes(p)
        stack.extend(_children(p))
    return total


def _hwm_bytes(pid: int) -> int:
    """VmHWM (the kernel's own peak RSS) of one process."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeRssSampler:
    """Samples the RSS of a process tree every ``interval`` seconds on a thread; also tracks the root's VmHWM
    (exact peak of the main process, which a sampler can miss between two samples)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_tree = 0
        self.peak_hwm = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_tree = max(self.peak_tree, tree_rss_bytes(self.pid))
            self.peak_hwm = max(self.peak_hwm, _hwm_bytes(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max(self.peak_tree, self.peak_hwm)


@dataclass
class ChildRun:
    returncode: int
    seconds: float
    peak_rss_bytes: int
    loadavg_before: list[float]
    loadavg_after: list[float]
    cpu_seconds: float = 0.0  # user + system CPU of the child tree (RUSAGE_CHILDREN delta)
    result: dict[str, Any] = field(default_factory=dict)
    stderr_tail: str = ""


def run_child(
    argv: Sequence[str],
    *,
    result_file: Path,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    cwd: Path = REPO,
) -> ChildRun:
    """Run ``argv`` as a child process, sampling its tree's RSS; the child writes its JSON to ``result_file``.

    A fresh process per measured run, so each one's peak RSS is its own (``RUSAGE_CHILDREN`` would report the
    largest child so far, not this one).
    """
    result_file.unlink(missing_ok=True)
    full_env = {**os.environ, **(env or {})}
    before = loadavg()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    stderr_path = result_file.with_suffix(".stderr")
    with stderr_path.open("w") as err:
        proc = subprocess.Popen(list(argv), cwd=cwd, env=full_env, stdout=err, stderr=err)
        with TreeRssSampler(proc.pid) as sampler:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    seconds = time.perf_counter() - started
    after = loadavg()
    usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (usage_after.ru_utime - usage.ru_utime) + (usage_after.ru_stime - usage.ru_stime)
    tail = stderr_path.read_text(errors="replace")[-3000:]
    result: dict[str, Any] = {}
    if result_file.exists():
        result = json.loads(result_file.read_text())
    return ChildRun(rc, seconds, sampler.peak, before, after, cpu, result, tail)


# --- fp32 matmul peak


def matmul_peak_gflops(n: int = 2048, repeat: int = 5, threads: int | None = None) -> dict[str, Any]:
    """Best-of-``repeat`` fp32 ``n x n @ n x n`` GFLOP/s (2 n^3 FLOPs) with ``threads`` torch threads."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    before = loadavg()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    flops = 2.0 * n**3
    return {
        "n": n,
        "threads": torch.get_num_threads(),
        "best_gflops": round(flops / min(times) / 1e9, 1),
        "median_gflops": round(flops / sorted(times)[len(times) // 2] / 1e9, 1),
        "loadavg_before": before,
        "loadavg_after": loadavg(),
    }


# --- writers


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, list):
        return " / ".join(_fmt(v) for v in value)
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def stamp_markdown(stamp: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in stamp["versions"].items() if v)
    return (
        f"Machine: {stamp['cpu']}, {stamp['cores']} cores, {stamp['ram_gib']} GiB RAM, "
        f"GPU: {stamp['gpu'] or 'none'}; Python {stamp['python']}; {versions}. "
        f"Load average at start (1/5/15 min): {_fmt(stamp['loadavg'])}. Taken {stamp['time']}.\n"
    )


def write_results(
    name: str,
    *,
    title: str,
    stamp: dict[str, Any],
    tables: dict[str, list[dict[str, Any]]],
    data: dict[str, Any],
    notes: Sequence[str] = (),
    out_dir: Path = RESULTS,
    loadavg_end: Sequence[float] | None = None,
) -> tuple[Path, Path]:
    """Write ``<name>.json`` (everything) and ``<name>.md`` (the tables, the stamp and notes).

    ``loadavg_end``: the load average at the end of the measurement when the files are written later (a
    results file summarised again); by default the load average now."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = {**stamp, "loadavg_end": list(loadavg_end) if loadavg_end is not None else loadavg()}
    json_path = out_dir / f"{name}.json"
    json_path.write_text(
        json.dumps({"name": name, "machine": stamp, "tables": tables, **data}, indent=2, default=str) + "\n"
    )
    md = [f"# {title}\n", stamp_markdown(stamp), f"Load average at end: {_fmt(stamp['loadavg_end'])}.\n"]
    for heading, rows in tables.items():
        md.append(f"\n## {heading}\n\n{markdown_table(rows)}")
    if notes:
        md.append("\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes))
    md_path = out_dir / f"{name}.md"
    md_path.write_text("".join(md))
    return json_path, md_path


def bench_python() -> str:
    """The benchmark venv's interpreter when it exists (it has TRL), else this one."""
    candidate = REPO / ".venv-bench" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def wait_for_quiet(threshold: float = 0.5, max_wait: float = 0.0, poll: float = 10.0) -> list[float]:
    """Wait up to ``max_wait`` seconds for the 1-minute load average to fall below ``threshold``."""
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(poll)
    return loadavg()
