"""openapi/openapi.json is an exact copy of what the server serves; every operation is documented."""

from __future__ import annotations

from pathlib import Path

from service.openapi import openapi_document, render

ROOT = Path(__file__).resolve().parents[2]


def test_committed_openapi_matches_the_app() -> None:
    committed = (ROOT / "openapi" / "openapi.json").read_text()
    assert committed == render(), "openapi/openapi.json is stale: run `make openapi`"


def test_every_operation_has_id_summary_tags_and_error_schema() -> None:
    document = openapi_document()
    seen: set[str] = set()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation.get("operationId"), (method, path)
            assert operation["operationId"] not in seen
            seen.add(operation["operationId"])
            assert operation.get("summary"), (method, path)
            assert operation.get("tags"), (method, path)
            if path.startswith("/v1/"):
                for status in ("401", "503"):
                    schema = operation["responses"][status]["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
