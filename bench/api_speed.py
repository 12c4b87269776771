"""Service speed: uploads through the API (throughput, server peak RSS flat in file size) and request latency /
throughput with wrk, alignd side by side with the naive baseline.

    .venv/bin/python bench/api_speed.py                 # make bench-api (uploads 50 + 200 MB, 1 GB model, wrk)
    .venv/bin/python bench/api_speed.py --quick         # bench-quick: 20 MB upload, 3 s wrk runs, no model
    .venv/bin/python bench/api_speed.py --production    # also PostgreSQL + Redis (arq) mode

Each server is its own process (``bench/serve_alignd.py``, ``bench/naive_app.py``), one uvicorn worker, so
its RSS is its own. Uploads stream from disk with httpx (multipart built chunk by chunk, never in memory).
wrk (Debian's package) drives ``GET /v1/jobs/{id}`` and ``POST /v1/jobs`` with a bearer key (Lua scripts
written next to the results' scratch files) at 1, 10 and 50 connections; the baseline's GET is measured right
after alignd's at each level.

Cores: with ``--pin`` (the default on a machine with 2 or more cores) each server runs on core 0 and this
script, with everything it starts (wrk, the upload client), on core 1, so the load generator does not steal
the server's core and the p99 measures the server rather than the scheduler's choices between them. Both
sides of every pair run pinned the same way; ``--no-pin`` shares all cores as before.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import REPO, WORK, TreeRssSampler, loadavg, machine_stamp, tree_rss_bytes, write_results
from validation_speed import generate_preference

KEY = "bench-key-" + "x" * 24
OTHER_KEY = "other-key-" + "y" * 24
API_KEYS = f"bench:{KEY},other:{OTHER_KEY}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise RuntimeError("server did not start")


# Set by main(): the cores each server process may run on (None: all), see the module docstring.
SERVER_CORES: set[int] | None = None


@contextlib.contextmanager
def server(argv: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    log = WORK / "api" / f"server-{port}.log"
    cores = SERVER_CORES
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            stdout=out,
            stderr=out,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
        )
        try:
            wait_port(port, proc)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def alignd_server(data_dir: Path, port: int, extra: list[str] = ()) -> contextlib.AbstractContextManager[Any]:  # type: ignore[assignment]
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    argv = [sys.executable, "bench/serve_alignd.py", "--port", str(port), "--data-dir", str(data_dir)]
    return server([*argv, "--api-keys", API_KEYS, *extra], port)


# --- uploads


def upload_dataset(base_url: str, path: Path, kind: str = "preference") -> tuple[float, dict[str, Any]]:
    import httpx

    with path.open("rb") as f, httpx.Client(base_url=base_url, timeout=600) as client:
        t0 = time.perf_counter()
        r = client.post(
            "/v1/datasets",
            headers={"Authorization": f"Bearer {KEY}"},
            data={"kind": kind, "name": path.name},
            files={"file": (path.name, f, "application/x-ndjson")},
        )
        seconds = time.perf_counter() - t0
    if r.status_code != 201:
        raise RuntimeError(f"upload failed: {r.status_code} {r.text[:500]}")
    return seconds, r.json()


def write_fake_safetensors(path: Path, size_bytes: int) -> None:
    """A valid safetensors file of about ``size_bytes``: F32 tensors of 64 Mi elements each, zero-filled."""
    per = 64 * 2**20
    count = max(1, -(-size_bytes // (per * 4)))  # round up: at least size_bytes
    header: dict[str, Any] = {}
    offset = 0
    for i in range(count):
        header[f"model.layers.{i}.mlp.weight"] = {
            "dtype": "F32",
            "shape": [per // 1024, 1024],
            "data_offsets": [offset, offset + per * 4],
        }
        offset += per * 4
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    chunk = b"\0" * (1 << 22)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        left = offset
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n


def upload_model(base_url: str, folder: Path) -> tuple[float, dict[str, Any]]:
    import httpx

    handles = [(p.name, p.open("rb")) for p in sorted(folder.iterdir()) if p.is_file()]
    try:
        with httpx.Client(base_url=base_url, timeout=1200) as client:
            t0 = time.perf_counter()
            r = client.post(
                "/v1/models",
                headers={"Authorization": f"Bearer {KEY}"},
                data={"name": folder.name},
                files=[("files", (name, h, "application/octet-stream")) for name, h in handles],
            )
            seconds = time.perf_counter() - t0
    finally:
        for _, h in handles:
            h.close()
    if r.status_code != 201:
        raise RuntimeError(f"model upload failed: {r.status_code} {r.text[:500]}")
    return seconds, r.json()


def bench_uploads(sizes_mb: list[int], model_gb: float) -> list[dict[str, Any]]:
    rows = []
    work = WORK / "api"
    for size in sizes_mb:
        path = work / f"preference-{size}mb.jsonl"
        if not path.exists() or abs(path.stat().st_size - size * 1e6) > 2e6:
            generate_preference(path, int(size * 1e6))
        port = free_port()
        with alignd_server(work / "data-upload", port) as proc:
            time.sleep(1.0)
            before = loadavg()
            idle = tree_rss_bytes(proc.pid)
            with TreeRssSampler(proc.pid, interval=0.02) as sampler:
                seconds, body = upload_dataset(f"http://127.0.0.1:{port}", path)
            rows.append(
                {
                    "what": f"dataset upload, preference {size} MB",
                    "mb": round(path.stat().st_size / 1e6, 1),
                    "records": body["num_records"],
                    "seconds": round(seconds, 2),
                    "mb_per_s": round(path.stat().st_size / 1e6 / seconds, 1),
                    "server_peak_rss_mb": round(sampler.peak / 1e6, 1),
                    "server_rss_before_mb": round(idle / 1e6, 1),
                    "load_before": before,
                    "load_after": loadavg(),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    if model_gb > 0:
        folder = work / "model-1gb"
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / "model.safetensors"
        if not weights.exists():
            write_fake_safetensors(weights, int(model_gb * 1e9))
        (folder / "config.json").write_text(
            json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
        )
        size = sum(p.stat().st_size for p in folder.iterdir())
        port = free_port()
        with alignd_server(work / "data-model", port) as proc:
            time.sleep(1.0)
            before = loadavg()
            idle = tree_rss_bytes(proc.pid)
            with TreeRssSampler(proc.pid, interval=0.02) as sampler:
                seconds, _ = upload_model(f"http://127.0.0.1:{port}", folder)
            rows.append(
                {
                    "what": "model upload, safetensors",
                    "mb": round(size / 1e6, 1),
                    "records": None,
                    "seconds": round(seconds, 2),
                    "mb_per_s": round(size / 1e6 / seconds, 1),
                    "server_peak_rss_mb": round(sampler.peak / 1e6, 1),
                    "server_rss_before_mb": round(idle / 1e6, 1),
                    "load_before": before,
                    "load_after": loadavg(),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(work / "data-model", ignore_errors=True)
    shutil.rmtree(work / "data-upload", ignore_errors=True)
    return rows


# --- latency with wrk


def lua_get(path: Path) -> Path:
    path.write_text(f'wrk.method = "GET"\nwrk.headers["Authorization"] = "Bearer {KEY}"\n')
    return path


def lua_post(path: Path, body: dict[str, Any]) -> Path:
    payload = json.dumps(json.dumps(body))  # a Lua string literal is a JSON string literal here
    path.write_text(
        'wrk.method = "POST"\n'
        f'wrk.headers["Authorization"] = "Bearer {KEY}"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {payload}\n"
        "statuses = {}\n"
        "response = function(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end\n"
    )
    return path


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def run_wrk(url: str, script: Path, connections: int, seconds: int) -> dict[str, Any]:
    threads = min(len(os.sched_getaffinity(0)), 2, connections)  # pinned to one core: one wrk thread
    before = loadavg()
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    pct = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    total = re.search(r"(\d+) requests in", out)
    return {
        "connections": connections,
        "req_per_s": round(rps, 1),
        "p50_ms": round(_ms(pct.get("50", "nan")), 2),
        "p99_ms": round(_ms(pct.get("99", "nan")), 2),
        "requests": int(total.group(1)) if total else None,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(0) if errors else "",
        "load_before": before,
        "load_after": loadavg(),
    }


def seed_alignd(base_url: str, tiny_dir: Path, sft_file: Path) -> dict[str, str]:
    """A base model, an sft dataset and one job in tenant ``bench``: what the GET and POST benchmarks use."""
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    _, model = upload_model(base_url, tiny_dir)
    with sft_file.open("rb") as f, httpx.Client(base_url=base_url, timeout=60) as client:
        r = client.post(
            "/v1/datasets", headers=headers, data={"kind": "sft"}, files={"file": ("sft.jsonl", f)}
        )
        r.raise_for_status()
        dataset = r.json()
        body = {"method": "sft", "base_model": model["id"], "datasets": {"sft": dataset["id"]}, "seed": 1}
        r = client.post("/v1/jobs", headers=headers, json=body)
        r.raise_for_status()
        job = r.json()
        # the other tenant cannot see it (tenancy is in place on the measured path)
        assert (
            client.get(f"/v1/jobs/{job['id']}", headers={"Authorization": f"Bearer {OTHER_KEY}"}).status_code
            == 404
        )
    return {"model": model["id"], "dataset": dataset["id"], "job": job["id"], "body": json.dumps(body)}


def tiny_inputs(work: Path) -> tuple[Path, Path]:
    """The tiny model (built once, shared) and a 16-example sft dataset in ``work``: what seed_alignd uploads."""
    from tests.helpers.tiny_model import build_tiny_llama, tiny_sft_jsonl

    tiny = WORK / "tiny-llama"
    if not (tiny / "config.json").exists():
        build_tiny_llama(tiny, seed=0)
    return tiny, tiny_sft_jsonl(work / "tiny-sft.jsonl", n=16)


def bench_latency(
    levels: list[int], seconds: int, production: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    work = WORK / "api"
    tiny, sft = tiny_inputs(work)
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {}

    naive_port = free_port()
    naive_db = work / "naive.db"
    naive_db.unlink(missing_ok=True)
    naive_argv = [
        sys.executable,
        "bench/naive_app.py",
        "--port",
        str(naive_port),
        "--db",
        str(naive_db),
        "--key",
        KEY,
    ]
    modes: list[tuple[str, list[str], Any]] = [("embedded (SQLite, inline queue)", [], None)]
    if production:
        probe = _pg_admin()
        if probe is not None:
            probe.close()
        if shutil.which("redis-server") and probe is not None:
            modes.append(("production (PostgreSQL, Redis/arq)", [], "production"))
        else:
            print(
                "[api] production mode skipped: no redis-server or no PostgreSQL at 127.0.0.1:5432",
                flush=True,
            )

    with server(naive_argv, naive_port):
        naive_url = f"http://127.0.0.1:{naive_port}/v1/jobs/job_bench"
        get_script = lua_get(work / "get.lua")
        for label, extra, kind in modes:
            with contextlib.ExitStack() as stack:
                if kind == "production":
                    extra = stack.enter_context(production_services(work))
                port = free_port()
                stack.enter_context(alignd_server(work / "data-api", port, extra))
                base = f"http://127.0.0.1:{port}"
                seeded = seed_alignd(base, tiny, sft)
                info[label] = seeded
                post_script = lua_post(work / "post.lua", json.loads(seeded["body"]))
                for c in levels:
                    for target, url, script, endpoint in (
                        ("alignd", f"{base}/v1/jobs/{seeded['job']}", get_script, "GET /v1/jobs/{id}"),
                        ("naive baseline", naive_url, get_script, "GET /v1/jobs/{id}"),
                        ("alignd", f"{base}/v1/jobs", post_script, "POST /v1/jobs"),
                    ):
                        if target == "naive baseline" and label != modes[0][0]:
                            continue
                        row = {
                            "mode": label if target == "alignd" else "SQLite, sync session",
                            "server": target,
                            "endpoint": endpoint,
                            **run_wrk(url, script, c, seconds),
                        }
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    return rows, info


def _pg_admin() -> Any:
    try:
        import psycopg
    except ImportError:
        return None
    for dsn in ("postgresql://postgres@127.0.0.1:5432/postgres", "postgresql://root@127.0.0.1:5432/postgres"):
        try:
            return psycopg.connect(dsn, autocommit=True, connect_timeout=3)
        except psycopg.OperationalError:
            continue
    return None


@contextlib.contextmanager
def production_services(work: Path) -> Iterator[list[str]]:
    name = f"alignd_bench_{secrets.token_hex(4)}"
    admin = _pg_admin()
    if admin is None:
        raise RuntimeError("no PostgreSQL at 127.0.0.1:5432")
    admin.execute(f'CREATE DATABASE "{name}"')
    user = admin.info.user
    port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(work)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port, redis)
        yield [
            "--database-url", f"postgresql+psycopg://{user}@127.0.0.1:5432/{name}",
            "--redis-url", f"redis://127.0.0.1:{port}/0",
        ]  # fmt: skip
    finally:
        redis.kill()
        redis.wait()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--production", action="store_true")
    parser.add_argument("--sizes", default=None, help="upload sizes in MB, comma-separated (default 50,200)")
    parser.add_argument("--model-gb", type=float, default=None)
    parser.add_argument("--seconds", type=int, default=None, help="wrk duration per measurement")
    parser.add_argument("--skip-uploads", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--name", default=None)
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=len(os.sched_getaffinity(0)) >= 2,
        help="servers on core 0, this script and wrk on core 1 (default with >= 2 cores)",
    )
    args = parser.parse_args()
    global SERVER_CORES
    if args.pin:
        SERVER_CORES = {0}
        os.sched_setaffinity(0, {1})  # wrk and the upload client inherit it
    if shutil.which("wrk") is None and not args.skip_latency:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk)")
    (WORK / "api").mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in (args.sizes or ("20" if args.quick else "50,200")).split(",")]
    model_gb = args.model_gb if args.model_gb is not None else (0.0 if args.quick else 1.0)
    seconds = args.seconds or (3 if args.quick else 10)
    levels = [1, 10, 50]
    stamp = machine_stamp(["fastapi", "uvicorn", "sqlmodel", "httpx", "uvloop", "httptools"])
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[:1]
    stamp["wrk"] = wrk_version[0] if wrk_version else None
    stamp["pinning"] = "servers on core 0, client and wrk on core 1" if args.pin else "none"

    uploads = [] if args.skip_uploads else bench_uploads(sizes, model_gb)
    latency, info = ([], {}) if args.skip_latency else bench_latency(levels, seconds, args.production)

    targets = []
    for row in uploads:
        if row["what"].startswith("dataset"):
            targets.append({"target": f"upload through the API >= 100 MB/s ({row['mb']} MB)", "measured": row["mb_per_s"],
                            "met": row["mb_per_s"] >= 100})  # fmt: skip
    ds = [r for r in uploads if r["what"].startswith("dataset")]
    if len(ds) >= 2:
        growth = ds[-1]["server_peak_rss_mb"] - ds[0]["server_peak_rss_mb"]
        targets.append({"target": f"server peak RSS flat in file size ({ds[0]['mb']} -> {ds[-1]['mb']} MB)",
                        "measured": f"{growth:+.1f} MB", "met": abs(growth) < 50})  # fmt: skip
    for c in (50,):
        ours = [r for r in latency if r["server"] == "alignd" and r["endpoint"].startswith("GET") and r["connections"] == c
                and r["mode"].startswith("embedded")]  # fmt: skip
        base = [r for r in latency if r["server"] == "naive baseline" and r["connections"] == c]
        if ours and base:
            ratio = ours[0]["req_per_s"] / base[0]["req_per_s"]
            targets.append({"target": "GET p99 < 50 ms at 50 concurrent", "measured": ours[0]["p99_ms"],
                            "met": ours[0]["p99_ms"] < 50})  # fmt: skip
            targets.append({"target": ">= 3x the naive baseline's req/s at 50 concurrent reads",
                            "measured": round(ratio, 2), "met": ratio >= 3})  # fmt: skip
    name = args.name or ("api_speed_quick" if args.quick else "api_speed")
    write_results(
        name,
        title="Service speed: uploads and API latency (wrk), alignd vs a naive FastAPI + sqlmodel baseline",
        stamp=stamp,
        tables={
            "Uploads through the API (embedded server)": uploads,
            "Latency and throughput (wrk)": latency,
            "Targets": targets,
        },
        data={"seeded": info, "wrk_seconds": seconds},
        notes=[
            "One uvicorn worker per server, each its own process; "
            + (
                "servers pinned to core 0, wrk (one thread) and the upload client to core 1."
                if args.pin
                else "wrk on the same cores as the servers (-t min(2, c))."
            ),
            "POST /v1/jobs: a valid sft job on the tiny model; embedded mode runs the real InlineQueue with no consumer "
            "threads started and production mode the real ArqQueue with no arq worker, so jobs are accepted and "
            "never trained (see bench/serve_alignd.py). Every POST adds a queued job row, so later levels query a "
            "larger table.",
            "Uploads stream from disk with httpx multipart; the server validates while spooling (dataset) or copies "
            "(model) to a staging file, then moves it into local storage.",
        ],
    )


if __name__ == "__main__":
    main()
