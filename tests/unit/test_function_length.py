"""Every function of the training child stays under 120 lines (the trainers share one loop, workers.training.loop,
instead of each repeating a 200-line skeleton)."""

from __future__ import annotations

import ast
from pathlib import Path

TRAINING = Path(__file__).resolve().parents[2] / "workers" / "training"
LIMIT = 120


def function_lengths(folder: Path) -> dict[str, int]:
    """``file:line name`` -> lines from ``def`` to the function's last line, for every function and method."""
    lengths: dict[str, int] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lengths[f"{path.relative_to(folder)}:{node.lineno} {node.name}"] = (
                    node.end_lineno - node.lineno + 1
                )
    return lengths


def test_the_count_sees_long_functions(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(130))
    (tmp_path / "long.py").write_text(
        f"def long():\n{body}\n\n\nclass A:\n    async def short(self):\n        pass\n"
    )
    assert function_lengths(tmp_path) == {"long.py:1 long": 131, "long.py:135 short": 2}


def test_every_training_function_is_under_120_lines() -> None:
    lengths = function_lengths(TRAINING)
    assert len(lengths) > 100  # the folder was found and read
    too_long = {name: n for name, n in lengths.items() if n >= LIMIT}
    assert not too_long, f"functions of {LIMIT} lines or more in workers/training: {too_long}"
