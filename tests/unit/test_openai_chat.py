"""The OpenAI facade's chat completions without a server (service/api/openai_chat_schemas.py,
service/core/openai_chat.py): the request onto the chat job's settings, what is refused, the failure of a job
as the request's error, and what a stream sends next."""

from __future__ import annotations

import pytest

from contract.hyperparameters import ChatHyperparameters
from service.api.openai_chat_schemas import OpenAIChatCompletionCreate
from service.core.errors import ConflictError, ValidationFailed
from service.core.jobs import JobStatus
from service.core.openai_chat import job_failure, text_deltas


def _request(**fields: object) -> OpenAIChatCompletionCreate:
    return OpenAIChatCompletionCreate.model_validate(
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_a_request_maps_onto_the_chat_jobs_settings_with_openais_defaults() -> None:
    request = _request(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "What "}, {"type": "text", "text": "colour?"}],
            },
            {"role": "assistant", "content": "Blue.", "name": "bot"},
            {"role": "user", "content": "Sure?"},
        ],
        max_tokens=7,
        stop="\n",
        user="someone",
        store=False,
    )
    settings = ChatHyperparameters.model_validate(request.hyperparameters())
    assert [(m.role, m.content) for m in settings.messages] == [
        ("system", "Be brief."),
        ("user", "What colour?"),
        ("assistant", "Blue."),
        ("user", "Sure?"),
    ]
    assert (settings.max_tokens, settings.temperature, settings.top_p, settings.n, settings.stop) == (
        7,
        1.0,
        1.0,
        1,
        ["\n"],
    )
    assert request.refused() == [] and not request.include_usage
    assert _request(max_completion_tokens=9).hyperparameters()["max_tokens"] == 9
    assert _request().hyperparameters()["max_tokens"] is None  # the child fills in what the context leaves


def test_fields_alignd_cannot_honour_are_refused_unless_they_are_off() -> None:
    off = _request(
        frequency_penalty=0,
        logprobs=False,
        tool_choice="none",
        tools=[],
        response_format={"type": "text"},
        modalities=["text"],
        max_tokens=5,
        max_completion_tokens=5,
    )
    assert off.refused() == []
    on = _request(
        frequency_penalty=0.1,
        logit_bias={"5": 1},
        modalities=["text", "audio"],
        max_tokens=4,
        max_completion_tokens=5,
    )
    assert [(p["field"], p["code"]) for p in on.refused()] == [
        ("frequency_penalty", "unsupported_parameter"),
        ("logit_bias", "unsupported_parameter"),
        ("modalities", "unsupported_parameter"),
        ("max_tokens", "conflicting_field"),
    ]


def test_a_failed_chat_job_is_a_400_for_its_input_and_a_500_otherwise() -> None:
    refused = job_failure("job_1", JobStatus.failed, "context_length_exceeded", "too long")
    assert isinstance(refused, ValidationFailed) and refused.details[0]["field"] == "messages"
    crashed = job_failure("job_1", JobStatus.failed, "training_crashed", "killed")
    assert (crashed.status, crashed.code) == (500, "training_crashed") and "job_1" in crashed.message
    assert isinstance(job_failure("job_1", JobStatus.cancelled, None, None), ConflictError)


def test_a_stream_sends_what_each_choice_added_and_stops_on_a_text_that_changed() -> None:
    sent = ["", ""]
    assert text_deltas(sent, []) == []
    assert text_deltas(sent, [{"index": 0, "text": "Hel"}, {"index": 1, "text": ""}]) == [(0, "Hel")]
    assert text_deltas(sent, [{"index": 0, "text": "Hello"}, {"index": 1, "text": "Yo"}]) == [
        (0, "lo"),
        (1, "Yo"),
    ]
    assert sent == ["Hello", "Yo"]
    assert text_deltas(sent, [{"index": 0, "text": "Help"}, {"index": 1, "text": "Yo"}]) is None  # a rerun


@pytest.mark.parametrize("stop", [["a"] * 5, [""], "", "x" * 65])
def test_stop_texts_are_at_most_four_of_1_to_64_characters(stop: object) -> None:
    with pytest.raises(ValueError):
        _request(stop=stop)
