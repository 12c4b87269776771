"""Throughput of the dataset validator alone (``alignd.validation``), in MB/s.

Generates a preference file and an sft file of about ``--size-mb`` MB each under a temporary folder (or
``--dir``), with varied lengths, some non-ASCII text, escaped quotes and newlines inside strings, then times
``validate_path`` on each (best of ``--repeat`` runs, so the page cache is warm and the figure is the
validator's, not the disk's). Also reports the raw read+hash rate as the ceiling. Peak RSS is printed to show
memory stays flat in file size.

    python bench/validation_speed.py [--size-mb 100] [--repeat 3] [--json]
    python bench/validation_speed.py --sizes 50,200 --results validation_speed   # make bench-validation

With ``--sizes`` it times the preference file at each size, each validation in a fresh child process (so the
child's peak RSS, from ``getrusage``, is the validator's alone and comparable across sizes), interleaved with
the read+hash ceiling, records the load average around every measurement, and with ``--results`` writes
``bench/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

# Runnable from a checkout before the SDK is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))

from alignd.validation import validate_path
from common import WORDS as _WORDS

_EXTRA = ["café", "naïve", "über", "日本語", "données", "😀", "ñandú", "Ελληνικά", "привет"]


def _paragraph(rng: random.Random, min_words: int, max_words: int) -> str:
    words = rng.choices(_WORDS, k=rng.randint(min_words, max_words))
    if rng.random() < 0.15:
        words[rng.randrange(len(words))] = rng.choice(_EXTRA)
    text = " ".join(words)
    if rng.random() < 0.3:
        text = text.replace(" then ", ' then "quoted"\n', 1)  # escapes inside JSON strings
    return text.capitalize() + "."


def _pool(rng: random.Random, n: int, min_words: int, max_words: int) -> list[str]:
    return [_paragraph(rng, min_words, max_words) for _ in range(n)]


def generate_preference(path: Path, size_bytes: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    prompts = _pool(rng, 3000, 8, 80)
    answers = _pool(rng, 6000, 20, 400)
    n = 0
    written = 0
    with path.open("w", encoding="utf-8", newline="\n") as f:
        while written < size_bytes:
            chosen, rejected = rng.sample(answers, 2)
            prompt: object = rng.choice(prompts)
            if rng.random() < 0.2:
                prompt = [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": prompt}]
            rec = {"id": n, "prompt": prompt, "chosen": chosen, "rejected": rejected}
            line = json.dumps(rec, ensure_ascii=rng.random() < 0.5) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            n += 1
    return n


def generate_sft(path: Path, size_bytes: int, seed: int = 1) -> int:
    rng = random.Random(seed)
    prompts = _pool(rng, 3000, 8, 80)
    answers = _pool(rng, 6000, 20, 400)
    n = 0
    written = 0
    with path.open("w", encoding="utf-8", newline="\n") as f:
        while written < size_bytes:
            rec: dict[str, object]
            if rng.random() < 0.5:
                rec = {"prompt": rng.choice(prompts), "completion": rng.choice(answers)}
            else:
                msgs = [{"role": "system", "content": "You are a helpful assistant."}]
                for _ in range(rng.randint(1, 3)):
                    msgs.append({"role": "user", "content": rng.choice(prompts)})
                    msgs.append({"role": "assistant", "content": rng.choice(answers)})
                rec = {"messages": msgs, "source": "bench"}
            line = json.dumps(rec, ensure_ascii=rng.random() < 0.5) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            n += 1
    return n


def _read_hash_rate(path: Path) -> float:
    size = path.stat().st_size
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            chunk.split(b"\n")
    return size / (time.perf_counter() - t0) / 1e6


def _time_validation(path: Path, kind: str, repeat: int) -> tuple[float, int, int]:
    best = float("inf")
    records = issues = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        report = validate_path(path, kind)
        best = min(best, time.perf_counter() - t0)
        records, issues = report.num_records, report.num_issues
    return path.stat().st_size / best / 1e6, records, issues


_CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[3])
from alignd.validation import validate_path
t0 = time.perf_counter()
report = validate_path(sys.argv[1], sys.argv[2])
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "records": report.num_records, "issues": report.num_issues,
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _validate_in_child(path: Path, kind: str) -> dict[str, float]:
    import subprocess

    client = str(Path(__file__).resolve().parents[1] / "client")
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), kind, client], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def sized_runs(sizes: list[float], repeat: int, work: Path, results: str | None) -> None:
    """Preference files of each size; validator MB/s (best of ``repeat`` child runs) and the child's peak RSS."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import loadavg, machine_stamp, write_results

    stamp = machine_stamp(["pydantic", "msgspec"])
    rows = []
    for size_mb in sizes:
        path = work / f"preference-{size_mb:g}mb.jsonl"
        if not path.exists() or abs(path.stat().st_size - size_mb * 1e6) > 2e6:
            generate_preference(path, int(size_mb * 1e6))
        size = path.stat().st_size
        _read_hash_rate(path)  # warm the page cache
        best: dict[str, float] | None = None
        peaks = []
        before = loadavg()
        ceiling = 0.0
        for _ in range(repeat):
            run = _validate_in_child(path, "preference")
            if run["issues"]:
                raise SystemExit(f"generated file has {run['issues']} issues")
            peaks.append(run["peak_rss_kb"] / 1024)
            if best is None or run["seconds"] < best["seconds"]:
                best = run
            ceiling = max(ceiling, _read_hash_rate(path))
        assert best is not None
        rows.append(
            {
                "kind": "preference",
                "mb": round(size / 1e6, 1),
                "records": int(best["records"]),
                "validate_mb_per_s": round(size / best["seconds"] / 1e6, 1),
                "read_hash_split_mb_per_s": round(ceiling, 1),
                "validator_peak_rss_mb": round(max(peaks), 1),
                "load_before": before,
                "load_after": loadavg(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if results:
        growth = rows[-1]["validator_peak_rss_mb"] - rows[0]["validator_peak_rss_mb"]
        worst = min(r["validate_mb_per_s"] for r in rows)
        write_results(
            results,
            title="Dataset validator alone (alignd.validation.validate_path)",
            stamp=stamp,
            tables={
                "Preference files": rows,
                "Targets": [
                    {"target": "validator >= 300 MB/s", "measured": worst, "met": worst >= 300},
                    {
                        "target": "peak RSS flat in file size",
                        "measured": f"{growth:+.1f} MB from {rows[0]['mb']} to {rows[-1]['mb']} MB",
                        "met": abs(growth) < 20,
                    },
                ],
            },
            data={"repeat": repeat},
            notes=[
                f"Best of {repeat} runs, each in a fresh process (page cache warm): the figure is the validator's, "
                "not the disk's. read_hash_split: reading, sha256 and splitting lines, the ceiling.",
                "Peak RSS: the validating process's ru_maxrss (interpreter and imports included).",
            ],
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write the files (default: a temp dir)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--sizes", default=None, help="comma-separated MB sizes: per-size preference runs")
    parser.add_argument("--results", default=None, help="with --sizes: write bench/results/<name>.json/.md")
    args = parser.parse_args()
    if args.sizes:
        work = args.dir or Path(__file__).resolve().parent / ".work" / "validation"
        work.mkdir(parents=True, exist_ok=True)
        sized_runs([float(x) for x in args.sizes.split(",")], args.repeat, work, args.results)
        return

    size = int(args.size_mb * 1e6)
    results: dict[str, dict[str, float | int]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for kind, gen in (("preference", generate_preference), ("sft", generate_sft)):
            path = Path(tmp) / f"{kind}.jsonl"
            lines = gen(path, size)
            mbps, records, issues = _time_validation(path, kind, args.repeat)
            if issues:
                raise SystemExit(
                    f"generated {kind} file has {issues} issues: the generator or the rules are off"
                )
            results[kind] = {
                "size_mb": round(path.stat().st_size / 1e6, 1),
                "records": records,
                "avg_line_bytes": round(path.stat().st_size / lines),
                "validate_mb_per_s": round(mbps, 1),
                "read_hash_split_mb_per_s": round(_read_hash_rate(path), 1),
            }
            os.unlink(path)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    machine = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    if args.json:
        print(json.dumps({"machine": machine, "results": results, "peak_rss_mb": round(peak_rss_mb, 1)}))
        return
    print(f"python {machine['python']} on {machine['cpu']}, {os.cpu_count()} cpus")
    print(
        f"{'kind':<11} {'MB':>6} {'records':>8} {'avg line':>9} {'validate MB/s':>14} {'read+hash MB/s':>15}"
    )
    for kind, r in results.items():
        print(
            f"{kind:<11} {r['size_mb']:>6} {r['records']:>8} {r['avg_line_bytes']:>9} "
            f"{r['validate_mb_per_s']:>14} {r['read_hash_split_mb_per_s']:>15}"
        )
    print(f"peak RSS {peak_rss_mb:.0f} MB (the generator's pools included)")


if __name__ == "__main__":
    main()
