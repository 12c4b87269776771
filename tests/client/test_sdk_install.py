"""``pip install ./client`` into a fresh venv pulls httpx and pydantic, never torch, fastapi or sqlmodel."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[2] / "client"


def test_client_installs_alone_without_server_dependencies(tmp_path: Path) -> None:
    # Build from a copy so the test leaves no build/ or egg-info in the source tree.
    source = tmp_path / "client"
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        check=True,
        timeout=600,
    )
    listed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.lower()
    names = {line.split("==")[0] for line in listed.splitlines() if line}
    assert {"alignd", "httpx", "pydantic"} <= names
    assert not names & {"torch", "fastapi", "sqlmodel", "transformers", "peft", "uvicorn", "sqlalchemy"}
    check = subprocess.run(
        [str(py), "-c", "import alignd, alignd.cli, alignd.validation; print(alignd.__version__)"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert check.stdout.strip() == "0.1.0"
    version = subprocess.run([str(venv / "bin" / "alignd"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and "0.1.0" in version.stdout
