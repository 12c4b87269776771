"""Upload staging folders a killed server left half-written are swept; a folder in use never is.

Real processes and files: `alignd-server serve` SIGKILLed while it copies a model upload into its staging
folder, then started again on the same data directory; another process's folder in use, held by its lock;
and the sweep racing requests in one process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.staging import open_staging, release_staging, staging_root, sweep_staging
from tests.service.server_process import ROOT, ServerProcess

UPLOAD_BYTES = 512 << 20  # large enough that copying it into staging takes a while to catch mid-way


def _upload_folders(data_dir: Path) -> list[Path]:
    root = staging_root(data_dir)
    return sorted(root.glob("upload-*")) if root.exists() else []


def _post_big_model(base_url: str, weights: Path) -> None:
    """Send the upload and give up on the answer: the server is killed while it stages the file."""
    headers = {"Authorization": "Bearer key-a"}
    try:
        with open(weights, "rb") as handle:
            httpx.post(
                f"{base_url}/v1/models",
                headers=headers,
                data={"name": "big"},
                files=[("files", ("model.safetensors", handle, "application/octet-stream"))],
                timeout=120,
            )
    except httpx.HTTPError:
        pass


HOLDER = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from service.staging import open_staging\n"
    "folder = open_staging(Path(sys.argv[1]), 'upload')\n"
    "(folder / 'part-0').write_bytes(b'half')\n"
    "print(folder, flush=True)\n"
    "time.sleep(120)\n"
)


def test_killed_servers_staging_is_swept_at_next_start_but_not_a_folder_in_use(tmp_path: Path) -> None:
    data_dir = tmp_path / "alignd"
    weights = tmp_path / "model.safetensors"
    with open(weights, "wb") as handle:
        handle.truncate(UPLOAD_BYTES)

    server = ServerProcess(data_dir, tmp_path / "server-1.log", staging_sweep_after_seconds="1")
    uploader = threading.Thread(target=_post_big_model, args=(f"http://127.0.0.1:{server.port}", weights))
    uploader.start()
    try:
        # Kill it once the route has started writing the part into its staging folder, before it is done.
        deadline = time.monotonic() + 120
        while True:
            parts = [part for folder in _upload_folders(data_dir) for part in folder.glob("part-*")]
            if parts and 0 < parts[0].stat().st_size < UPLOAD_BYTES:
                break
            assert time.monotonic() < deadline, "the upload never reached its staging folder"
            time.sleep(0.005)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    finally:
        server.stop()
        uploader.join()
    [abandoned] = _upload_folders(data_dir)
    assert 0 < (abandoned / "part-0").stat().st_size < UPLOAD_BYTES

    # Another process sharing the data directory is staging an upload right now (it holds the lock).
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(data_dir)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        in_use = Path(holder.stdout.readline().strip())
        old = time.time() - 3600  # old enough for any threshold: only its lock protects it
        os.utime(in_use / "part-0", (old, old))
        os.utime(in_use, (old, old))
        time.sleep(1.5)  # the abandoned folder is now older than the 1 s threshold

        restarted = ServerProcess(data_dir, tmp_path / "server-2.log", staging_sweep_after_seconds="1")
        try:
            # Swept before the server answered its first request, the killed upload's folder is gone.
            assert not abandoned.exists()
            assert _upload_folders(data_dir) == [in_use]
            assert (in_use / "part-0").read_bytes() == b"half"
            # The reconciler's passes (every 0.5 s) leave it alone too.
            time.sleep(2)
            assert (in_use / "part-0").read_bytes() == b"half"
        finally:
            restarted.stop()
    finally:
        holder.kill()
        holder.wait()
    # Its holder died without cleaning up: now it is abandoned, and the next sweep takes it.
    assert sweep_staging(data_dir, older_than=1) == [in_use.name]
    assert _upload_folders(data_dir) == []


def test_sweep_spares_young_folders_and_foreign_names(tmp_path: Path) -> None:
    root = staging_root(tmp_path)
    abandoned = root / "upload-abcd1234"
    young = root / "export-young123"
    foreign = root / "notes"  # not the staging naming scheme: never touched
    for folder in (abandoned, young, foreign):
        folder.mkdir(parents=True)
        (folder / "data.jsonl").write_bytes(b"{}\n")
    old = time.time() - 1000
    for path in (abandoned / "data.jsonl", abandoned, foreign / "data.jsonl", foreign):
        os.utime(path, (old, old))

    assert sweep_staging(tmp_path, older_than=900) == ["upload-abcd1234"]
    assert not abandoned.exists() and young.exists() and foreign.exists()
    # A folder is as young as the newest file in it: one being written keeps it.
    os.utime(young, (old, old))
    assert sweep_staging(tmp_path, older_than=900) == []


def test_sweep_never_removes_a_folder_in_use_while_requests_come_and_go(tmp_path: Path) -> None:
    """Requests open, fill and release folders while a sweep with no age threshold runs in a loop: every
    folder a request holds stays whole until it releases it (the lock, and the check after locking)."""
    failures: list[str] = []
    served: list[int] = []
    stop = threading.Event()

    def request() -> None:
        while not stop.is_set():
            try:
                folder = open_staging(tmp_path, "upload")
            except OSError as exc:
                failures.append(f"open_staging: {exc!r}")
                continue
            try:
                (folder / "part-0").write_bytes(b"x" * 1024)
                time.sleep(0.001)
                if (folder / "part-0").read_bytes() != b"x" * 1024:
                    failures.append(f"{folder} changed under its request")
            except OSError as exc:
                failures.append(f"{folder}: {exc!r}")
            finally:
                release_staging(folder)
            served.append(1)

    def sweep() -> None:
        while not stop.is_set():
            sweep_staging(tmp_path, older_than=0)

    threads = [threading.Thread(target=request) for _ in range(3)] + [threading.Thread(target=sweep)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(served) > 50  # the race was really run
    assert list(staging_root(tmp_path).iterdir()) == []


def test_staging_purpose_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lowercase letters"):
        open_staging(tmp_path, "../up")
