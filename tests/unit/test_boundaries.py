"""Layer boundaries that keep the code easy to change, checked by importing and by reading the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(folder: Path) -> set[str]:
    names: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_service_and_runner_never_load_torch() -> None:
    code = (
        "import sys, service.api.app, alignd_server.cli, alignd_server.embedded, workers.runner, contract.protocol;"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules);"
        "print(','.join(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip() == ""


def test_service_source_does_not_import_torch_or_training() -> None:
    imported = _imported_modules(ROOT / "service")
    assert not imported & {"torch", "transformers", "peft"}
    for path in (ROOT / "service").rglob("*.py"):
        assert "workers.training" not in path.read_text(), path


def test_client_imports_nothing_of_the_server() -> None:
    imported = _imported_modules(ROOT / "client" / "alignd")
    assert not imported & {"service", "workers", "torch", "fastapi", "sqlmodel", "sqlalchemy"}
    third_party = imported - set(sys.stdlib_module_names) - {"alignd"}
    # msgspec: the optional "fast" extra, imported under `except ImportError` (the stdlib parser otherwise;
    # test_validation.py runs every case on both).
    assert third_party <= {"httpx", "pydantic", "msgspec"}, third_party
    tree = ast.parse((ROOT / "client" / "alignd" / "validation.py").read_text())
    guarded = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Try)
        and any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("msgspec") for n in node.body)
        and any(isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in node.handlers)
    ]
    assert guarded, "msgspec must be imported inside try/except ImportError"
