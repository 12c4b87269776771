"""Every error class raised by the status that maps to it, carrying status, code, message, details, request id."""

from __future__ import annotations

import alignd
import pytest

from tests.client.scripted import Reply, ScriptedServer, error_reply

CASES = [
    (400, alignd.BadRequestError, "bad_request"),
    (401, alignd.AuthenticationError, "unauthorized"),
    (403, alignd.PermissionDeniedError, "forbidden"),
    (404, alignd.NotFoundError, "model_not_found"),
    (409, alignd.ConflictError, "in_use"),
    (413, alignd.PayloadTooLargeError, "payload_too_large"),
    (415, alignd.UnsupportedMediaTypeError, "unsupported_media_type"),
    (422, alignd.ValidationError, "invalid_dataset"),
    (429, alignd.RateLimitError, "rate_limited"),
    (500, alignd.ServerError, "internal"),
    (502, alignd.ServerError, "bad_gateway"),
    (503, alignd.ServiceUnavailableError, "service_unavailable"),
    (418, alignd.APIStatusError, "teapot"),
]


@pytest.mark.parametrize(("status", "error", "code"), CASES)
def test_status_maps_to_error_class(
    server: ScriptedServer, status: int, error: type[alignd.APIStatusError], code: str
) -> None:
    details = [{"line": 3, "code": "invalid_json", "message": "invalid JSON"}]
    reply = error_reply(status, code, f"message for {status}", details)
    reply.headers["x-request-id"] = f"req_{status}"
    server.route("DELETE", "/v1/models/model_1", reply)
    with alignd.Client(base_url=server.base_url, max_retries=0) as client, pytest.raises(error) as info:
        client.models.delete("model_1")
    exc = info.value
    assert type(exc) is error
    assert isinstance(exc, alignd.APIStatusError) and isinstance(exc, alignd.AlignError)
    assert exc.status == status
    assert exc.code == code
    assert exc.message == f"message for {status}"
    assert exc.details == details
    assert exc.request_id == f"req_{status}"
    assert f"req_{status}" in str(exc) and code in str(exc)


def test_dataset_validation_error_lists_bad_lines(server: ScriptedServer, tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    details = [{"line": 2, "code": "invalid_json", "message": "invalid JSON"}]
    server.route("POST", "/v1/datasets", error_reply(422, "invalid_dataset", "1 bad line", details))
    with alignd.Client(base_url=server.base_url) as client, pytest.raises(alignd.ValidationError) as info:
        client.datasets.upload(path, kind="sft")
    assert info.value.code == "invalid_dataset"
    assert info.value.details == details
    call = server.calls("POST", "/v1/datasets")[0]
    assert b'name="kind"' in call.body and b"sft" in call.body
    assert b'filename="bad.jsonl"' in call.body


def test_non_json_error_body_still_maps(server: ScriptedServer) -> None:
    server.route("GET", "/v1/models/model_1", Reply(502, "<html>upstream down</html>", {"Retry-After": "0"}))
    with (
        alignd.Client(base_url=server.base_url, max_retries=0) as client,
        pytest.raises(alignd.ServerError) as info,
    ):
        client.models.get("model_1")
    assert info.value.status == 502
    assert "upstream down" in info.value.message
    assert info.value.code == "server_error"


def test_malformed_success_body_raises_response_validation_error(server: ScriptedServer) -> None:
    server.route("GET", "/v1/models/model_1", Reply(200, {"object": "model"}))  # no id
    with alignd.Client(base_url=server.base_url) as client, pytest.raises(alignd.APIResponseValidationError):
        client.models.get("model_1")


def test_ids_cannot_change_the_path() -> None:
    with alignd.Client(base_url="http://127.0.0.1:9") as client, pytest.raises(ValueError):
        client.models.get("../datasets")


def test_job_failed_error_carries_job_and_error() -> None:
    job = alignd.Job(id="job_1", status="failed", error=alignd.JobError(code="oom", message="out of memory"))
    exc = alignd.JobFailedError(job)
    assert exc.job is job
    assert exc.code == "oom"
    assert exc.error is not None and exc.error.message == "out of memory"
    assert "out of memory" in str(exc)
