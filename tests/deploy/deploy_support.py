"""Shared helpers for tests/deploy: paths, the helm runner and the parsed-render type."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "alignd"
GPU_VALUES = CHART / "ci" / "gpu-production-values.yaml"
POOLS_VALUES = CHART / "ci" / "worker-pools-values.yaml"
MULTI_NODE_VALUES = CHART / "ci" / "multi-node-values.yaml"
FETCH_TOOLS = REPO / "helm" / "fetch-tools.sh"
TOOLS_BIN = REPO / ".tools" / "bin"


@dataclass(frozen=True)
class Tools:
    helm: Path
    kubectl: Path


@dataclass(frozen=True)
class Rendered:
    text: str
    objects: list[dict]

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, component: str | None = None) -> dict:
        found = [
            o
            for o in self.of_kind(kind)
            if component is None
            or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        ]
        assert len(found) == 1, f"expected one {kind} {component or ''}, got {len(found)}"
        return found[0]

    @property
    def kinds(self) -> set[str]:
        return {o["kind"] for o in self.objects}


def run_helm(tools: Tools, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tools.helm), *args], capture_output=True, text=True, timeout=120, check=False, cwd=REPO
    )


def values_args(values: Sequence[Path], sets: Sequence[str], set_strings: Sequence[str]) -> list[str]:
    args: list[str] = []
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    for s in set_strings:
        args += ["--set-string", s]
    return args
