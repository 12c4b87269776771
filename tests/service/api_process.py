"""The plain API (``service.api.app:create_app``, arq mode) under uvicorn in its own process.

For tests that need what a thread in the test process cannot give: a GIL of its own (a thousand concurrent
requests from the test's client), or an environment of its own (``TMPDIR``: where Starlette would spool).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from tests.conftest import API_KEYS, free_port

ROOT = Path(__file__).resolve().parents[2]


def api_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """ALIGND_* for an arq-mode API (no in-process runner) with the test tenants' keys."""
    env = {
        "ALIGND_DATA_DIR": str(data_dir),
        "ALIGND_QUEUE": "arq",
        "ALIGND_API_KEYS": ",".join(f"{tenant}:{key}" for tenant, key in API_KEYS.items()),
    }
    env.update({f"ALIGND_{name.upper()}": value for name, value in settings.items()})
    return env


class ApiProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> ApiProcess:
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "uvicorn", "--factory", "service.api.app:create_app"]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the API exited at start: {self.log_path.read_text(errors='replace')}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/readyz", timeout=2).status_code == 200:
                    return self
            time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError("the API did not become ready")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
