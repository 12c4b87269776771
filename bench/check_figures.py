"""Every benchmark figure quoted in README.md and docs/performance.md comes from a committed results file.

A *figure* is a number with a benchmark unit: a ratio (``1.71x``), a rate (MB/s, episodes/s, tokens/s, req/s,
GFLOP/s), a size (GiB, GB, MB), a time (ms, us, s, min, ``7 min 41 s``) or a percentage. Numbers that share
one unit (``102-120 MB/s``, ``3.00 vs 6.59 GiB``, ``71 -> 132 tokens/s``) are one figure, and every one of
them must match. They are matched against ``bench/results/*.json`` (the per-step ``raw`` data left out):

- a number under a key whose name gives its unit (``*_mb_per_s``, ``*_gib``, ``*_ms``, ``*_s``, ``fraction_*``
  and ``*_share`` as percentages, ``ratios.*`` as ``x``), or a figure written inside a string value;
- a ratio may also be the quotient of two values of one column of one table (alignd over TRL, say);
- a results file with a ``restored_from`` key (an earlier run, kept for comparison) counts only in a
  paragraph that names it: an earlier run's figure is right only where the text says it is one;
- a figure right after ``<=``, ``>=``, ``<``, ``>`` or ``target`` is a target: some Targets row's ``target``
  text must hold it.

A number matches a value when the value, rounded as the text writes the number, gives it (``42%`` matches
0.424, ``1,660 req/s`` matches 1660.3). A Markdown table captioned with ``bench/results/<name>.md`` must be
copied from that file row for row. A figure that is no benchmark result (a profile share, a development A/B
run, arithmetic on other figures) must be on ALLOWED with its reason; an ALLOWED figure that is no longer in
the text is reported too, so the list cannot go stale.

Usage: ``python bench/check_figures.py [--root DIR]``; exit status 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHECKED = ("README.md", "docs/performance.md")
RESULTS = "bench/results"

_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
# "7 min 41" only where seconds follow ("7 min 41 s", "7 min 41-8 min 09 s").
_TOKEN = rf"(?:\d+ min \d{{1,2}}(?=\s*(?:s\b|-))|{_NUM})"
_SEP = r"\s*(?:->|-|\u2013|\bvs\.?|\bto\b)\s*"  # \u2013: an en dash
_UNIT = (
    r"(?P<unit>x\b|%|\s+(?:MB/s|GB/s|episodes/s|(?:useful\s+)?tokens/s|req/s|GFLOP/s|GiB|GB|MB|ms|us|µs"
    r"|min\b|s\b))"
)
FIGURE_RE = re.compile(rf"(?<![\w.,/^])(?P<numbers>{_TOKEN}(?:{_SEP}{_TOKEN})*){_UNIT}")
_TOKEN_RE = re.compile(rf"\d+ min \d{{1,2}}|{_NUM}")
_TARGET_BEFORE_RE = re.compile(r"(?:<=|>=|<|>|≤|≥|\btarget(?:\s+of)?)\s*(?:\*\*)?$")
_TARGET_AFTER_RE = re.compile(r"^\s*target\b")
_CAPTION_RE = re.compile(r"`bench/results/([\w.-]+)\.md`")


@dataclass(frozen=True)
class Number:
    value: float
    decimals: int


@dataclass(frozen=True)
class Figure:
    path: str
    line: int
    text: str
    unit: str
    numbers: tuple[Number, ...]
    target: bool
    paragraph: str


@dataclass(frozen=True)
class Allowed:
    """Figures of one paragraph (the one holding ``near``) that are not benchmark results, and why."""

    path: str
    near: str
    figures: tuple[str, ...]
    reason: str


PROFILE = "a profiler's share of the step or request, not a benchmark result (profiles are not kept)"
DEV_AB = "an A/B or exploratory run while developing the change, not written to bench/results"
ARITHMETIC = "arithmetic on figures that are matched elsewhere in the text, not a measurement"

ALLOWED: tuple[Allowed, ...] = (
    Allowed("README.md", "bootstrap intervals", ("95%",), "the intervals' confidence level, a setting"),
    Allowed(
        "docs/performance.md", "by tens of percent", ("10-20%",), "the spread seen between repeated runs"
    ),
    Allowed("docs/performance.md", "`bench/common.py`", ("50 ms",), "the RSS sampler's interval, a setting"),
    Allowed(
        "docs/performance.md",
        "**42.4%**",
        ("29.1%",),
        "the alignd-only run (--skip-trl) before this session's changes; its results file was not kept",
    ),
    Allowed("docs/performance.md", "What bounds it. Memory", ("1.6 GB",), ARITHMETIC + ": 134.5M fp32 x 3"),
    Allowed("docs/performance.md", "What bounds it. Memory", ("0.54 GB",), ARITHMETIC + ": 134.5M x 4 bytes"),
    Allowed("docs/performance.md", "What bounds it. Memory", ("0.27 GB",), ARITHMETIC + ": 134.5M x 2 bytes"),
    Allowed(
        "docs/performance.md", "What bounds it. Memory", ("0.4 GB",), "RSS of the runtime before loading"
    ),
    Allowed(
        "docs/performance.md",
        "a py-spy profile",
        ("26%", "27%", "23%", "15%", "6%", "5%", "4%", "7%"),
        PROFILE,
    ),
    Allowed(
        "docs/performance.md",
        "**The training process's heap**",
        ("2.78 GiB", "2.96 GiB", "2.32 GiB", "15.0-15.2 s", "2.57 GiB", "15.3 s", "2.10 GiB", "17.6-21.3 s"),
        "development measurements of alignd's PPO child alone (VmRSS after each pass, VmHWM; an A/B of 3 updates "
        "per heap policy), not a benchmark's results file",
    ),
    Allowed(
        "docs/performance.md",
        "139.5 useful tokens/s",
        ("139.5 useful tokens/s", "29.1%", "14.8 GiB"),
        "the alignd-only run (--skip-trl) before this session's changes; its results file was not kept",
    ),
    Allowed(
        "docs/performance.md",
        "aten::bernoulli_",
        ("21%", "15%", "71 -> 132 useful tokens/s", "15.4 -> 10.9 GiB"),
        PROFILE + "; the 3-step before/after is " + DEV_AB,
    ),
    Allowed("docs/performance.md", "A/B interleaved", ("10.9 -> 8.5 GiB", "2%"), DEV_AB),
    Allowed("docs/performance.md", "Where the step goes now", ("53%", "20%", "12%", "2.6%", "3%"), PROFILE),
    Allowed("docs/performance.md", "In one process, alternating", ("304-317 MB/s", "257-265 MB/s"), DEV_AB),
    Allowed(
        "docs/performance.md", "In one process, alternating", ("1.7-1.9 ms",), ARITHMETIC + ": 1/ceiling"
    ),
    Allowed("docs/performance.md", "In one process, alternating", ("3-6%",), ARITHMETIC + ": 281-291 vs 300"),
    Allowed(
        "docs/performance.md", "In one process, alternating", ("900 MB/s",), "the issue's figure, a goal"
    ),
    Allowed("docs/performance.md", "**281-291 MB/s**", ("3-6%",), ARITHMETIC + ": 281-291 vs 300"),
    Allowed(
        "docs/performance.md",
        "A generation-0 threshold of 50,000",
        ("60-140 ms",),
        DEV_AB + " (young collections timed by the same gc.callbacks probe, the POST phase)",
    ),
    Allowed("docs/performance.md", "unpinned, wrk's threads", ("300 ms", "82 ms"), DEV_AB),
    Allowed(
        "docs/performance.md",
        "cProfile in-process",
        ("43%", "25%", "12%", "1,000 -> 290 us", "372 -> 1,660-2,350 req/s", "480-600 req/s"),
        PROFILE + "; the before/after req/s span several " + DEV_AB,
    ),
    Allowed(
        "docs/performance.md",
        "What is left of the latency at 50 connections",
        ("14 ms",),
        ARITHMETIC + ": 50 connections / 3,553 req/s",
    ),
    Allowed(
        "docs/performance.md",
        "the tensors kept for the backward, counted with",
        ("800 MB", "105 MB", "53 MB", "642 MB"),
        "saved_tensors_hooks counts of one training forward while developing the GRPO changes",
    ),
    Allowed(
        "docs/performance.md",
        "leaving out answers of advantage 0 saves more",
        ("41%", "30%", "25%", "24%"),
        "means of each run's per-update frac_reward_zero_std, from its results file's raw data (which this "
        "check leaves out)",
    ),
    Allowed(
        "docs/performance.md",
        "Measured while developing them, one process each",
        ("1.55 to 1.26 GiB",),
        DEV_AB,
    ),
    Allowed(
        "docs/performance.md",
        "peak RSS of a few updates in one process",
        ("2.24 GiB",),
        DEV_AB,
    ),
    Allowed(
        "docs/performance.md",
        "sampling: `torch.multinomial` took",
        ("7.2 ms", "2.58 -> 2.37 s", "172-194 ms", "15.4 ms", "2.63 -> 2.52 s"),
        PROFILE + "; the sampling-call times are " + DEV_AB,
    ),
)


# A value and, for a superseded results file (one with "restored_from"), the file's name, which the quoting
# paragraph must cite.
Value = tuple[float, str | None]


@dataclass
class Pool:
    """Every value the results files hold, by unit; targets apart."""

    measured: dict[str, list[Value]] = field(default_factory=lambda: defaultdict(list))
    targets: dict[str, list[Value]] = field(default_factory=lambda: defaultdict(list))


def _canonical_unit(raw: str) -> str:
    unit = raw.strip()
    if unit.endswith("tokens/s"):
        return "tokens/s"
    return "us" if unit == "µs" else unit


def _number(token: str) -> Number:
    if " min " in token:
        minutes, seconds = token.split(" min ")
        return Number(int(minutes) * 60 + int(seconds), 0)
    plain = token.replace(",", "")
    return Number(float(plain), len(plain.partition(".")[2]))


def figures_in(text: str) -> Iterator[tuple[re.Match[str], str, tuple[Number, ...]]]:
    """(match, canonical unit, numbers) for every figure in ``text``."""
    for match in FIGURE_RE.finditer(text):
        numbers = tuple(_number(token) for token in _TOKEN_RE.findall(match.group("numbers")))
        yield match, _canonical_unit(match.group("unit")), numbers


# ------------------------------------------------------------------------------------------- results files


def _unit_scales(path: Sequence[str]) -> list[tuple[str, float]]:
    """The units (and scale factors) a number under this key path is quoted in."""
    if not path:
        return []
    key = path[-1].lower()
    if "ratios" in path[:-1]:
        return [("x", 1.0)]
    rates = {
        "mb_per_s": "MB/s",
        "episodes_per_s": "episodes/s",
        "tokens_per_s": "tokens/s",
        "req_per_s": "req/s",
        "gflops": "GFLOP/s",
    }
    for part, unit in rates.items():
        if part in key:
            return [(unit, 1.0)]
    if "fraction" in key or key.endswith("_share"):
        return [("%", 100.0)]
    if key.endswith("_gib"):
        return [("GiB", 1.0)]
    if key == "mb" or key.endswith("_mb"):
        return [("MB", 1.0), ("GB", 0.001)]
    if key.endswith("_ms"):
        return [("ms", 1.0)]
    if key.endswith("_min"):
        return [("min", 1.0)]
    if key.endswith("_s") or key.startswith("s_per_") or "seconds" in key:
        return [("s", 1.0), ("min", 1 / 60)]
    return []


def _add_string(pool: Pool, text: str, is_target: bool, cite: str | None) -> None:
    into = pool.targets if is_target else pool.measured
    for _, unit, numbers in figures_in(text):
        into[unit].extend((n.value, cite) for n in numbers)


def _add_table(pool: Pool, rows: list[dict[str, Any]], cite: str | None) -> None:
    """Quotients of two rows' values in one column (``2.79x`` = alignd's req/s over the baseline's), and a
    Targets row's ``measured`` in the unit its ``target`` text uses."""
    columns: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        for key, value in row.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and _unit_scales([key]):
                columns[key].append(float(value))
        target, measured = row.get("target"), row.get("measured")
        if isinstance(target, str) and isinstance(measured, int | float):
            for _, unit, _ in list(figures_in(target))[:1]:
                pool.measured[unit].append((measured * (100.0 if unit == "%" else 1.0), cite))
    for key, values in columns.items():
        # Side-by-side ratios are of rates and sizes (episodes/s, GiB, req/s); quotients of durations are never
        # quoted, and a large table's duration column (fuzz seconds per target) would match almost any ratio.
        if _unit_scales([key])[0][0] in ("s", "ms", "min"):
            continue
        pool.measured["x"].extend(
            (a / b, cite) for i, a in enumerate(values) for j, b in enumerate(values) if i != j and b
        )


def _walk(pool: Pool, node: Any, path: tuple[str, ...], cite: str | None) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "raw":  # per-step timings: quoting one of those is not quoting a result
                _walk(pool, value, (*path, key), cite)
    elif isinstance(node, list):
        if node and all(isinstance(row, dict) for row in node):
            _add_table(pool, node, cite)
        for item in node:
            _walk(pool, item, path, cite)
    elif isinstance(node, str):
        _add_string(pool, node, bool(path) and path[-1] == "target", cite)
    elif isinstance(node, int | float) and not isinstance(node, bool):
        for unit, scale in _unit_scales(path):
            pool.measured[unit].append((node * scale, cite))


def load_pool(results_dir: Path) -> Pool:
    pool = Pool()
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        _walk(pool, data, (), path.stem if "restored_from" in data else None)
    return pool


def matches(number: Number, values: Sequence[Value], paragraph: str, *, signed: bool = False) -> bool:
    """``number`` is one of ``values`` to its decimals. Unsigned by default (text says "fell by 0.47" for a
    -0.47); ``signed`` for ratios, which are never negative: a raw -0.474 in a series is not "0.474x"."""
    tolerance = 0.5 * 10.0 ** (-number.decimals) * (1 + 1e-9)
    return any(
        abs((value if signed else abs(value)) - number.value) <= tolerance
        and (cite is None or cite in paragraph)
        for value, cite in values
    )


# ------------------------------------------------------------------------------------------- Markdown text


def _blocks(lines: Sequence[str]) -> list[tuple[int, str]]:
    """(first line number, text) per paragraph. Every table row and heading is a block of its own, every list
    item starts one; fenced code is left out (a command line is not a figure)."""
    blocks: list[tuple[int, str]] = []
    block: list[str] = []
    start = 0
    fenced = False

    def flush() -> None:
        if block:
            blocks.append((start, " ".join(block)))
            block.clear()

    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            fenced = not fenced
        elif fenced or not stripped:
            flush()
        elif stripped.startswith(("|", "#")):
            flush()
            blocks.append((number, stripped))
        else:
            if stripped.startswith("- ") or re.match(r"\d+\. ", stripped):
                flush()
            if not block:
                start = number
            block.append(stripped)
    flush()
    return blocks


def figures_of(path: str, text: str) -> list[Figure]:
    figures = []
    for line, block in _blocks(text.splitlines()):
        scanned = re.sub(r"`[^`]*`", lambda m: " " * len(m.group(0)), block)
        for match, unit, numbers in figures_in(scanned):
            before = scanned[max(0, match.start() - 24) : match.start()]
            after = scanned[match.end() : match.end() + 12]
            figures.append(
                Figure(
                    path=path,
                    line=line,
                    text=" ".join(match.group(0).split()),
                    unit=unit,
                    numbers=numbers,
                    target=bool(_TARGET_BEFORE_RE.search(before) or _TARGET_AFTER_RE.match(after)),
                    paragraph=block,
                )
            )
    return figures


def copied_tables(path: str, text: str, results_dir: Path) -> tuple[set[int], list[str]]:
    """Line numbers of tables captioned ``(bench/results/X.md)``, and problems where a row is not in X.md."""
    lines = text.splitlines()
    copied: set[int] = set()
    problems: list[str] = []
    caption: str | None = None
    for number, line in enumerate(lines, 1):
        if line.startswith("|") and caption is not None:
            source = results_dir / f"{caption}.md"
            rows = {row.strip() for row in source.read_text().splitlines()} if source.exists() else set()
            if line.strip() not in rows:
                problems.append(
                    f"{path}:{number}: table row not in {RESULTS}/{caption}.md: {line.strip()[:80]}"
                )
            copied.add(number)
            continue
        if line.strip():
            found = _CAPTION_RE.findall(line)
            caption = found[-1] if found and not line.startswith("|") else None
    return copied, problems


# ------------------------------------------------------------------------------------------- the check


def _allowed_for(figure: Figure) -> list[Allowed]:
    return [
        entry
        for entry in ALLOWED
        if entry.path == figure.path and figure.text in entry.figures and entry.near in figure.paragraph
    ]


def check(root: Path, files: Sequence[str] = CHECKED) -> list[str]:
    """Every problem as ``path:line: message``; empty when every figure is matched or allowed."""
    results_dir = root / RESULTS
    pool = load_pool(results_dir)
    problems: list[str] = []
    used: set[tuple[Allowed, str]] = set()
    for path in files:
        text = (root / path).read_text()
        copied, table_problems = copied_tables(path, text, results_dir)
        problems += table_problems
        for figure in figures_of(path, text):
            if figure.line in copied:
                continue
            allowed = _allowed_for(figure)
            if allowed:
                used.update((entry, figure.text) for entry in allowed)
                continue
            values = (pool.targets if figure.target else pool.measured)[figure.unit]
            signed = figure.unit == "x"
            missing = [n for n in figure.numbers if not matches(n, values, figure.paragraph, signed=signed)]
            if missing:
                kind = "target text" if figure.target else "current value"
                shown = ", ".join(f"{n.value:g}" for n in missing)
                problems.append(
                    f"{path}:{figure.line}: {figure.text}: no {kind} in {RESULTS}/*.json gives {shown} {figure.unit}"
                )
    for entry in ALLOWED:
        if entry.path not in files:
            continue
        for figure_text in entry.figures:
            if (entry, figure_text) not in used:
                problems.append(
                    f"{entry.path}: allow-list entry {figure_text!r} near {entry.near!r} is not used"
                )
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args(argv)
    problems = check(args.root)
    for problem in problems:
        print(problem)
    if not problems:
        print(f"every figure in {', '.join(CHECKED)} is in {RESULTS}/*.json or allowed with a reason")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
