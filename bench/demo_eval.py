"""Record the last `make demo` evaluation as bench/results/demo_eval.json + .md (the README quotes its table).

    make demo && .venv/bin/python bench/demo_eval.py --wall-seconds <the demo's "finished in N s">

`make demo` writes the evaluate job's result (GET /v1/jobs/{id}/evaluation, as the SDK returns it) to
.alignd-demo/demo_eval.json; this copies it into a results file with the machine described and one table row
per candidate and grader, the figures the demo printed. Nothing is recomputed here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine_stamp, write_results

SOURCE = REPO / ".alignd-demo" / "demo_eval.json"


def _interval(value: float | None, low: float | None, high: float | None) -> str:
    return "-" if value is None or low is None or high is None else f"{value:.2f} [{low:.2f}, {high:.2f}]"


def rows(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """The demo's printed table: per candidate and grader, mean and win-rate vs the baseline with 95% CIs."""
    table = []
    for candidate in evaluation["candidates"]:
        for grader, g in candidate["graders"].items():
            table.append(
                {
                    "candidate": candidate["name"],
                    "grader": grader,
                    "mean [CI]": _interval(g["mean"], g["ci_low"], g["ci_high"]),
                    f"win-rate vs {evaluation['baseline']} [CI]": _interval(
                        g.get("win_rate"), g.get("win_rate_ci_low"), g.get("win_rate_ci_high")
                    ),
                    "eos_rate": round(candidate["eos_rate"], 2),
                    "mean_length": round(candidate["mean_length"], 2),
                    "kl_to_base": round(candidate["kl_to_base"], 2),
                }
            )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--wall-seconds", type=float, required=True, help="the demo's own 'finished in N s'")
    parser.add_argument(
        "--load-at-start", type=float, required=True, help="1-minute load average at its start"
    )
    args = parser.parse_args()
    evaluation = json.loads(args.source.read_text(encoding="utf-8"))
    write_results(
        "demo_eval",
        title="make demo: the evaluate job at its end (SmolLM2-135M-Instruct, 16 held-out prompts)",
        stamp=machine_stamp([]),
        tables={"Candidates (greedy answers to 16 held-out prompts)": rows(evaluation)},
        data={
            "evaluation": evaluation,
            "demo_wall_s": args.wall_seconds,
            "demo_load_at_start": args.load_at_start,
        },
        notes=[
            "pirate: a string_check rule grader (1 when the answer says 'matey'); judge_rm: a reward model the "
            "demo trains on 40 pairs no other stage sees (examples/data/demo_judge_preference.jsonl).",
            f"Win-rates are paired per prompt against {evaluation['baseline']} (ties count half), with 95% "
            "bootstrap intervals.",
        ],
    )


if __name__ == "__main__":
    main()
