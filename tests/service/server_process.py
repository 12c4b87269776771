"""`alignd-server serve` as a real process, for tests that SIGKILL the server itself."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import API_KEYS, free_port

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """`alignd-server serve` (embedded mode) as a real process on a free port."""

    def __init__(self, data_dir: Path, log_path: Path, **settings: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        env = {
            **os.environ,
            "ALIGND_DATA_DIR": str(data_dir),
            "ALIGND_API_KEYS": ",".join(f"{tenant}:{key}" for tenant, key in API_KEYS.items()),
            # A dead server's lease lapses quickly, and the restarted one's reconciler notices at once.
            "ALIGND_LEASE_SECONDS": "3",
            "ALIGND_HEARTBEAT_SECONDS": "0.5",
            "ALIGND_RECONCILE_INTERVAL_SECONDS": "0.5",
            "ALIGND_JOB_MAX_TRIES": "3",
            "ALIGND_TORCH_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **{f"ALIGND_{name.upper()}": value for name, value in settings.items()},
        }
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "alignd_server.cli", "serve", "--port", str(self.port)],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_ready()

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, self.log_path.read_text(errors="replace")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200:
                    return
            assert time.monotonic() < deadline, self.log_path.read_text(errors="replace")
            time.sleep(0.2)

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"Authorization": f"Bearer {API_KEYS['tenant-a']}"},
            timeout=60,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
