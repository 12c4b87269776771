"""The API's garbage-collector policy, measured: ``GET /v1/jobs/{id}`` at 50 connections with
``ALIGND_GC_FREEZE`` off and on, side by side in one invocation.

    .venv/bin/python bench/api_gc.py            # make bench-api-gc (2 rounds, 10 s wrk runs)
    .venv/bin/python bench/api_gc.py --quick    # 1 round, 3 s runs

Each round starts one embedded server per policy (``bench/serve_alignd.py``, pinned to core 0, wrk on core 1,
as in ``bench/api_speed.py``) and measures it in phases: reads on a fresh database, 50-connection POSTs that
queue a few thousand jobs (what the read at 50 connections follows in ``make bench-api``), then reads twice
more. The servers run with ``--gc-probe``, so every phase also reports how many full (generation 2)
collections ran and how long the longest held the process: the probe is ``gc.callbacks``, read on SIGUSR1.
The policies alternate (off, on, off, on) so that a drift of the VM shows on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import api_speed
from api_speed import free_port, lua_get, lua_post, run_wrk, seed_alignd, server, tiny_inputs
from common import WORK, machine_stamp, write_results

POLICIES = {"off": "false", "on": "true"}  # ALIGND_GC_FREEZE
PHASES = ("GET fresh", "POST", "GET after POSTs", "GET after POSTs (again)")


def read_probe(proc: Any, path: Path) -> dict[str, Any]:
    """The collections since the last read: count, and the full ones' count, longest and total pause."""
    path.unlink(missing_ok=True)
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:  # the server renames a whole file into place
        time.sleep(0.05)
    probe = json.loads(path.read_text())
    full = [pause for generation, pause in probe["collections"] if generation == 2]
    return {
        "collections": len(probe["collections"]),
        "full_collections": len(full),
        "full_pause_max_ms": round(max(full), 1) if full else 0.0,
        "full_pause_total_ms": round(sum(full), 1),
        "tracked_objects": probe["tracked_objects"],
    }


def measure_policy(policy: str, round_no: int, seconds: int, tiny: Path, sft: Path) -> list[dict[str, Any]]:
    work = WORK / "api-gc"
    data_dir = work / f"data-{policy}"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    probe_path = work / f"probe-{policy}.json"
    port = free_port()
    argv = [sys.executable, "bench/serve_alignd.py", "--port", str(port), "--data-dir", str(data_dir),
            "--api-keys", api_speed.API_KEYS, "--gc-probe", str(probe_path)]  # fmt: skip
    rows: list[dict[str, Any]] = []
    os.environ["ALIGND_GC_FREEZE"] = POLICIES[policy]  # the server process inherits it
    try:
        with server(argv, port) as proc:
            base = f"http://127.0.0.1:{port}"
            seeded = seed_alignd(base, tiny, sft)
            get_url, get_script = f"{base}/v1/jobs/{seeded['job']}", lua_get(work / "get.lua")
            post_script = lua_post(work / "post.lua", json.loads(seeded["body"]))
            run_wrk(get_url, get_script, 50, 2)  # warm-up: the first requests' lazy imports
            read_probe(proc, probe_path)
            for phase in PHASES:
                url, script = (f"{base}/v1/jobs", post_script) if phase == "POST" else (get_url, get_script)
                measured = run_wrk(url, script, 50, seconds)
                row = {"gc_freeze": policy, "round": round_no, "phase": phase,
                       **{k: measured[k] for k in ("req_per_s", "p50_ms", "p99_ms", "requests", "non_2xx")},
                       **read_probe(proc, probe_path)}  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        os.environ.pop("ALIGND_GC_FREEZE", None)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    summary = []
    for policy in POLICIES:
        reads = [r for r in rows if r["gc_freeze"] == policy and r["phase"].startswith("GET after")]
        posts = [r for r in rows if r["gc_freeze"] == policy and r["phase"] == "POST"]
        summary.append({
            "gc_freeze": policy,
            "read_runs": len(reads),
            "worst_p99_ms": max(r["p99_ms"] for r in reads),
            "median_p99_ms": sorted(r["p99_ms"] for r in reads)[len(reads) // 2],
            "mean_req_per_s": round(sum(r["req_per_s"] for r in reads) / len(reads), 1),
            "post_req_per_s": round(sum(r["req_per_s"] for r in posts) / len(posts), 1),
            "full_pause_max_ms": max(r["full_pause_max_ms"] for r in reads),
            "full_collections": sum(r["full_collections"] for r in reads),
        })  # fmt: skip
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=int, default=None, help="wrk duration per phase")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk)")
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs 2 cores: the server on core 0, wrk on core 1")
    api_speed.SERVER_CORES = {0}
    os.sched_setaffinity(0, {1})
    rounds = args.rounds or (1 if args.quick else 2)
    seconds = args.seconds or (3 if args.quick else 10)
    work = WORK / "api-gc"
    (WORK / "api").mkdir(parents=True, exist_ok=True)  # server() logs there
    work.mkdir(parents=True, exist_ok=True)
    tiny, sft = tiny_inputs(work)
    stamp = machine_stamp(["fastapi", "uvicorn", "uvloop", "httptools"])
    stamp["pinning"] = "servers on core 0, wrk (one thread) on core 1"
    rows: list[dict[str, Any]] = []
    for round_no in range(1, rounds + 1):
        for policy in POLICIES:
            rows.extend(measure_policy(policy, round_no, seconds, tiny, sft))
    summary = summarise(rows)
    off, on = summary
    name = "api_gc_quick" if args.quick else "api_gc"
    ratio = round(off["worst_p99_ms"] / on["worst_p99_ms"], 2) if on["worst_p99_ms"] else None
    write_results(
        name,
        title="API garbage-collector policy: GET /v1/jobs/{id} at 50 connections, ALIGND_GC_FREEZE off vs on",
        stamp=stamp,
        tables={"Phases (wrk, 50 connections)": rows, "Summary (reads after the POSTs)": summary},
        data={"wrk_seconds": seconds, "rounds": rounds, "ratios": {"worst_p99_off_over_on": ratio}},
        notes=[
            "One embedded server per policy and round (SQLite, the real InlineQueue with no consumer threads: "
            "jobs are accepted and never trained), started fresh, seeded with a tiny model, a dataset and one "
            "job, warmed with 2 s of reads; ALIGND_GC_FREEZE=false keeps the interpreter's collector as it was.",
            "collections / full_collections: garbage collections during the phase (all generations / generation "
            "2), from gc.callbacks in the server; full_pause_*: how long those full ones held the process.",
            "The POST phase queues a few thousand jobs; the reads after it are what make bench-api's 50-connection "
            "read follows (it comes after the 1- and 10-connection POST runs).",
        ],
    )


if __name__ == "__main__":
    main()
