"""Layer boundaries that keep the code easy to change, checked by reading the source and by importing it.

- ``service`` (the API, its domain, storage, queues) never imports ``workers`` or torch: the composition root
  ``alignd_server`` wires the two (embedded mode, the CLI).
- the SDK (``client/alignd``) imports nothing of the server, and only httpx, pydantic and the optional msgspec;
- the training child (``workers/training``) imports no web or database layer, not even through a module it
  imports;
- ``contract`` (what the API and the child share) imports nothing of service, workers, torch or the web stack.

The source checks follow first-party imports (those inside functions too) through every module they reach; the
import checks load the real modules in a fresh interpreter. ``test_the_checkers_*`` shows each one failing on a
synthetic package tree, so none of them passes for want of looking.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Where each first-party top-level package lives; any other import is third party (or the stdlib).
FIRST_PARTY = {
    "alignd_server": ROOT,
    "contract": ROOT,
    "service": ROOT,
    "workers": ROOT,
    "alignd": ROOT / "client",
}
TORCH = {"torch", "transformers", "peft"}
WEB_AND_DB = {"fastapi", "starlette", "uvicorn", "sqlmodel", "sqlalchemy", "alembic"}


def _module_imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` (the file of ``module``) imports, relative imports resolved, at any depth of the
    file (function bodies included). ``from a import b`` yields ``a`` and ``a.b`` (``b`` may be a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            names.add(origin)
            names.update(f"{origin}.{alias.name}" for alias in node.names)
    return names


def _source_of(module: str, first_party: dict[str, Path]) -> Path | None:
    root = first_party.get(module.split(".")[0])
    if root is None:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None  # a name imported from a module (``from a import b`` where b is a function), not a module


def _modules_under(folder: Path) -> list[str]:
    """The dotted names of the modules under ``folder``, counted from the first folder above it that is not
    a package (``client/`` for the SDK, the repository for the rest)."""
    root = folder
    while (root / "__init__.py").is_file():
        root = root.parent
    return [
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for path in sorted(folder.rglob("*.py"))
    ]


def reachable_imports(folder: Path, *, first_party: dict[str, Path] | None = None) -> dict[str, str]:
    """Every module the source under ``folder`` imports, directly or through the first-party modules it
    imports (their packages' ``__init__`` included), each mapped to the module that imports it."""
    first_party = FIRST_PARTY if first_party is None else first_party
    found: dict[str, str] = {}
    todo = _modules_under(folder)
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo.extend(".".join(parts[:depth]) for depth in range(1, len(parts)))  # parents run first
        path = _source_of(module, first_party)
        if path is None:
            continue
        for name in _module_imports(path, module):
            found.setdefault(name, module)
            todo.append(name)
    return found


def violations(imports: dict[str, str], forbidden: set[str]) -> list[str]:
    """``importer -> module`` for each import of a forbidden module or of anything inside one."""
    return sorted(
        f"{importer} -> {name}"
        for name, importer in imports.items()
        if any(name == bad or name.startswith(bad + ".") for bad in forbidden)
    )


def loaded_after_importing(modules: list[str], *, cwd: Path = ROOT) -> set[str]:
    """Every module in ``sys.modules`` after a fresh interpreter (started in ``cwd``) imports ``modules``."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


def service_modules() -> list[str]:
    """Every module of the service package (the migration scripts only run under Alembic)."""
    return [name for name in _modules_under(ROOT / "service") if not name.startswith("service.db.migrations")]


# ---------------------------------------------------------------------------------------------- the checks


def test_service_source_never_imports_the_workers_or_torch() -> None:
    assert violations(reachable_imports(ROOT / "service"), {"workers", "alignd_server", *TORCH}) == []


def test_importing_every_service_module_loads_no_workers_and_no_torch() -> None:
    loaded = loaded_after_importing(service_modules())
    assert "service.api.app" in loaded and "service.reconciler" in loaded  # the walk found the modules
    assert violations(dict.fromkeys(loaded, "service"), {"workers", "alignd_server", *TORCH}) == []


def test_the_composition_root_and_the_runner_never_load_torch() -> None:
    loaded = loaded_after_importing(
        [
            "alignd_server.cli",
            "alignd_server.embedded",
            "workers.runner",
            "workers.tasks",
            "contract.protocol",
        ]
    )
    assert "workers.runner" in loaded
    assert loaded.isdisjoint(TORCH), sorted(loaded & TORCH)


def test_client_imports_nothing_of_the_server() -> None:
    imports = reachable_imports(ROOT / "client" / "alignd")
    assert violations(imports, {"service", "workers", "contract", "alignd_server", *TORCH, *WEB_AND_DB}) == []
    third_party = {name.split(".")[0] for name in imports} - set(sys.stdlib_module_names) - {"alignd"}
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


def test_importing_the_client_loads_nothing_of_the_server() -> None:
    # Started in client/: the alignd found first is the one in this tree, installed or not.
    loaded = loaded_after_importing(["alignd", "alignd.cli", "alignd.validation"], cwd=ROOT / "client")
    assert "alignd.validation" in loaded
    forbidden = {"service", "workers", "contract", "alignd_server", *TORCH, *WEB_AND_DB}
    assert violations(dict.fromkeys(loaded, "alignd"), forbidden) == []


def test_training_child_imports_no_web_or_database_layer() -> None:
    imports = reachable_imports(ROOT / "workers" / "training")
    assert "torch" in imports  # the walk reads the trainers
    forbidden = {
        *WEB_AND_DB,
        "service.db",
        "service.api",
        "service.queue",
        "service.storage",
        "alignd_server",
    }
    assert violations(imports, forbidden) == []


def test_contract_imports_nothing_of_service_workers_torch_or_the_web_stack() -> None:
    forbidden = {"service", "workers", "alignd_server", *TORCH, *WEB_AND_DB}
    assert violations(reachable_imports(ROOT / "contract"), forbidden) == []
    modules = _modules_under(ROOT / "contract")
    loaded = loaded_after_importing(modules)
    assert "contract.protocol" in loaded
    assert violations(dict.fromkeys(loaded, "contract"), forbidden) == []


# ------------------------------------------------------------------------- the checkers catch what they must


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_source_checker_finds_direct_lazy_relative_and_transitive_imports(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "svc/__init__.py": "",
            "svc/direct.py": "import wrk.runner\n",
            "svc/lazy.py": "def later():\n    from wrk import tasks\n",
            "svc/api/__init__.py": "from ..core import rules\n",  # relative: svc.core.rules
            "svc/core/__init__.py": "",
            "svc/core/rules.py": "import torch.nn as nn\n",  # reached only through svc.api
            "svc/clean.py": "import json\nfrom svc.core import rules as _\n",
            "wrk/__init__.py": "",
            "wrk/runner.py": "",
            "wrk/tasks.py": "",
        },
    )
    first_party = {"svc": tmp_path, "wrk": tmp_path}
    imports = reachable_imports(tmp_path / "svc" / "api", first_party=first_party)
    assert violations(imports, {"torch"}) == ["svc.core.rules -> torch.nn"]
    everything = reachable_imports(tmp_path / "svc", first_party=first_party)
    assert violations(everything, {"wrk"}) == [
        "svc.direct -> wrk.runner",
        "svc.lazy -> wrk",
        "svc.lazy -> wrk.tasks",
    ]
    # A package name that only starts like a forbidden one is not it.
    assert violations({"torchvision_like": "svc.x", "wrkshop": "svc.y"}, {"torch", "wrk"}) == []


def test_the_import_checker_sees_a_module_loaded_at_import_time(tmp_path: Path) -> None:
    _write(tmp_path, {"svc/__init__.py": "import wrk.runner\n", "wrk/__init__.py": "", "wrk/runner.py": ""})
    loaded = loaded_after_importing(["svc"], cwd=tmp_path)
    assert violations(dict.fromkeys(loaded, "svc"), {"wrk"}) == ["svc -> wrk", "svc -> wrk.runner"]
