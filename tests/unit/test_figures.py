"""bench/check_figures.py: every benchmark figure in README.md and docs/performance.md is in bench/results.

The committed text must pass, and a copy of it with one figure changed must fail, naming the figure."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import check_figures
from bench.check_figures import Number, figures_in, matches

REPO = Path(__file__).resolve().parents[2]


def test_the_committed_readme_and_performance_doc_quote_only_results() -> None:
    assert check_figures.check(REPO) == []


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    shutil.copy(REPO / "README.md", root / "README.md")
    shutil.copy(REPO / "docs" / "performance.md", root / "docs" / "performance.md")
    shutil.copytree(REPO / "bench" / "results", root / "bench" / "results")
    return root


def _run(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "check_figures.py"), "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) >= 1, old
    path.write_text(text.replace(old, new, 1))


def test_the_unchanged_copy_passes_from_the_command_line(tmp_path: Path) -> None:
    proc = _run(_copy_tree(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("path", "old", "new", "expected"),
    [
        # a ratio no results file holds
        ("README.md", "0.356x its peak memory", "0.349x its peak memory", "README.md:"),
        # one end of a range
        ("README.md", "281-291 MB/s on the", "281-295 MB/s on the", "281-295 MB/s"),
        # the previous session's quiet run: committed, but superseded, so only where the text cites it
        (
            "README.md",
            "0.356x its peak memory",
            "0.474x its peak memory",
            "0.474x",
            # (ppo_vs_trl.json's raw series holds a -0.4743: ratios are matched with their sign, so it is not it)
        ),
        # a test-suite timing (bench/results/make_timings.json)
        ("README.md", "5 min 55 s", "5 min 18 s", "5 min 18 s"),
        # a target the Targets rows do not state
        ("README.md", "(target 60%", "(target 65%", "no target text"),
        # a figure in the summary table of the doc
        (
            "docs/performance.md",
            "**2.65x** (232 vs 87.7 tokens/s)",
            "**2.65x** (232 vs 88.7 tokens/s)",
            "88.7",
        ),
        # a row of a table copied from bench/results/<name>.md
        (
            "docs/performance.md",
            "| 1 | fp32 | alignd | 6 | 2.29 | 0.532 |",
            "| 1 | fp32 | alignd | 6 | 2.29 | 0.542 |",
            "table row",
        ),
        # an allow-listed figure that left the text makes its entry stale
        ("docs/performance.md", "304-317 MB/s", "304-318 MB/s", "is not used"),
    ],
)
def test_a_changed_figure_in_a_copy_fails(
    tmp_path: Path, path: str, old: str, new: str, expected: str
) -> None:
    root = _copy_tree(tmp_path)
    _replace_once(root / path, old, new)
    proc = _run(root)
    assert proc.returncode == 1, proc.stdout
    assert expected in proc.stdout, proc.stdout


def test_a_changed_result_fails_the_unchanged_text(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    _replace_once(root / "bench/results/make_timings.json", '"wall_s": 223', '"wall_s": 250')
    proc = _run(root)
    assert proc.returncode == 1
    assert "README.md:" in proc.stdout and "223 s" in proc.stdout, proc.stdout


def _numbers(text: str) -> list[tuple[str, list[float]]]:
    return [(unit, [n.value for n in numbers]) for _, unit, numbers in figures_in(text)]


def test_figures_are_found_with_their_unit_and_every_number() -> None:
    assert _numbers("7 min 41-8 min 09 s") == [("s", [461, 489])]
    assert _numbers("(1,660 vs 595 req/s); 2.7x at 1") == [("req/s", [1660, 595]), ("x", [2.7])]
    assert _numbers("71 -> 132 useful tokens/s, 15.4 -> 10.9 GiB") == [
        ("tokens/s", [71, 132]),
        ("GiB", [15.4, 10.9]),
    ]
    # not figures: a count of 422s, a product of dimensions, a version, a file size in MiB
    assert _numbers("422s naming the field, 8 x 32 tokens, torch 2.13.0, a 64 MiB object") == []


def test_a_number_matches_a_value_rounded_as_the_text_writes_it() -> None:
    assert matches(Number(42, 0), [(42.4, None)], "")
    assert not matches(Number(43, 0), [(42.4, None)], "")
    assert matches(Number(0.455, 3), [(3.0 / 6.59, None)], "")
    assert matches(Number(0.46, 2), [(3.0 / 6.59, None)], "")  # 0.4552 written with two decimals
    assert not matches(Number(0.45, 2), [(3.0 / 6.59, None)], "")
    # a superseded results file counts only where the paragraph names it
    assert not matches(Number(0.474, 3), [(0.474, "ppo_vs_trl_previous_session")], "0.474x")
    assert matches(Number(0.474, 3), [(0.474, "ppo_vs_trl_previous_session")], "ppo_vs_trl_previous_session")
