"""Print the API's OpenAPI document (``make openapi`` writes it to openapi/openapi.json)."""

from __future__ import annotations

import json
from typing import Any

from service.api.app import create_app
from service.settings import Settings


def openapi_document() -> dict[str, Any]:
    # The schema does not depend on settings; a throwaway Settings keeps it from reading the environment.
    return create_app(Settings(_env_file=None)).openapi()


def render() -> str:
    return json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")
