"""The chat method's child side (workers/training/chat.py): incremental text with stop texts held back, the
token budget against the model's context, and one completion of the tiny model in this process with the
``chat`` lines it reports."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from contract.hyperparameters import ChatHyperparameters
from contract.protocol import ProgressWriter, TrainingSpec
from workers.training import chat
from workers.training.context import RunContext
from workers.training.errors import TrainingError

# A stand-in tokenizer: token i is PIECES[i]; "é" is two tokens, each half of its UTF-8 bytes.
PIECES = [b"Hel", b"lo", b" wor", b"ld", b"\xc3", b"\xa9", b"!", b" STO", b"P", b" S"]


def _decode(ids: list[int]) -> str:
    return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


def _feed(text: chat.ChoiceText, ids: list[int]) -> list[str]:
    shown = []
    for token in ids:
        text.push(token, eos=False)
        shown.append(text.shown)
    return shown


def test_text_grows_token_by_token_and_waits_for_a_whole_character() -> None:
    text = chat.ChoiceText(_decode, stops=[])
    shown = _feed(text, [0, 1, 4, 5, 6])
    assert shown == ["Hel", "Hello", "Hello", "Helloé", "Helloé!"]  # the lone 0xC3 waits for its second byte
    text.end("length")
    assert (text.text, text.finish_reason, text.sampled) == ("Helloé!", "length", 5)


def test_a_stop_text_cuts_the_completion_and_is_held_back_until_it_cannot_be_one() -> None:
    text = chat.ChoiceText(_decode, stops=[" STOP"])
    shown = _feed(text, [0, 1, 9])  # "Hello S": " S" may begin " STOP"
    assert shown == ["Hel", "Hello", "Hello"]
    _feed(text, [2])  # " S wor": it did not
    assert text.shown == "Hello S wor" and text.finish_reason is None
    _feed(text, [7, 8, 3])
    assert (text.text, text.finish_reason) == ("Hello S wor", "stop")  # cut where " STOP" began
    assert all(prefix == text.text[: len(prefix)] for prefix in shown)  # what was shown is kept


def test_eos_ends_a_choice_and_the_completion_counts_every_sampled_token() -> None:
    completion = chat.Completion(_decode, n=2, stops=[], eos_ids={6}, max_tokens=3, prompt_tokens=5)
    assert completion.on_tokens([0, 0]) == [False, False]
    assert completion.on_tokens([6, 1]) == [True, False]  # choice 0 sampled its EOS
    assert completion.on_tokens([2, 2]) == [True, True]  # choice 1 reached max_tokens
    report = completion.report()
    assert report["choices"] == [
        {"index": 0, "text": "Hel", "finish_reason": "stop"},
        {"index": 1, "text": "Hello wor", "finish_reason": "length"},
    ]
    assert report["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


def test_the_token_budget_fits_the_context_or_is_refused() -> None:
    assert chat.token_budget(16, None, 512) == 496
    assert chat.token_budget(16, 100, 512) == 100
    assert chat.token_budget(16, None, None) == 4096  # a config without its context: the cap
    with pytest.raises(TrainingError) as refused:
        chat.token_budget(16, 500, 512)
    assert refused.value.code == "context_length_exceeded"
    assert "context is 512 tokens: the messages take 16 and max_tokens asks for 500" in refused.value.message


def _run(model_dir: Path, tmp_path: Path, **hp: Any) -> list[dict[str, Any]]:
    spec = TrainingSpec(
        job_id="job_chat",
        method="chat",
        base_model={"id": "model_tiny", "name": "tiny", "path": str(model_dir)},  # type: ignore[arg-type]
        datasets={},
        lora={},
        hyperparameters=ChatHyperparameters.model_validate(hp).model_dump(),
        seed=3,
        output_dir=str(tmp_path / "out"),
    )
    out = io.StringIO()
    chat.run(RunContext(spec=spec, progress=ProgressWriter(out)))
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_completion_of_the_tiny_model_reports_its_text_as_chat_lines(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What colour is the sky?"},
    ]
    lines = _run(tiny_model_dir, tmp_path, messages=messages, max_tokens=6, n=2, temperature=0)
    reports = [line for line in lines if line["type"] == "chat"]
    assert reports[0]["choices"] == [{"index": i, "text": "", "finish_reason": None} for i in range(2)]
    final = reports[-1]
    assert [c["finish_reason"] for c in final["choices"]] in (["length"] * 2, ["stop"] * 2)
    assert final["choices"][0]["text"] == final["choices"][1]["text"]  # greedy: the same answer twice
    assert final["usage"]["prompt_tokens"] > 10 and final["usage"]["completion_tokens"] <= 12
    with pytest.raises(TrainingError) as refused:
        _run(tiny_model_dir, tmp_path, messages=messages, max_tokens=510)
    assert refused.value.code == "context_length_exceeded"
