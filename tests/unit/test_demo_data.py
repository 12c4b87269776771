"""The demo's held-out prompts are held out: no training file, no feedback-round prompt and no judge pair asks
them (an earlier version of the demo evaluated on 5 prompts its SFT, reward-model or PPO data contained)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _prompts(path: Path) -> set[str]:
    prompts = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        prompts.add(record["prompt"] if "prompt" in record else record["messages"][0]["content"])
    return prompts


def test_eval_prompts_are_asked_by_no_training_data() -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import demo
    finally:
        sys.path.remove(str(EXAMPLES))
    trained: dict[str, set[str]] = {
        path.name: _prompts(path) for path in sorted((EXAMPLES / "data").glob("*.jsonl"))
    }
    trained["ROUND_PROMPTS"] = set(demo.ROUND_PROMPTS)
    assert set(demo.HELD_OUT_PROMPTS) <= set(demo.EVAL_PROMPTS)
    assert len(set(demo.EVAL_PROMPTS)) == len(demo.EVAL_PROMPTS)
    overlap = {name: sorted(prompts & set(demo.EVAL_PROMPTS)) for name, prompts in trained.items()}
    assert {name: found for name, found in overlap.items() if found} == {}
    assert demo.JUDGE_PREFERENCE_DATA.name in trained  # the judge's pairs are among the files checked
