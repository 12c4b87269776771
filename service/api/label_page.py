"""``GET /label/{feedback_set_id}``: the labeling page, ``service/api/static/label/`` (served by
:mod:`service.api.console`, whose assets it loads).

The page talks to the public REST API only (``/next``, ``/labels``, the set itself) with the annotator's API
key, which it keeps in ``sessionStorage`` (gone when the tab closes).
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.console import ConsoleFiles, html


def label_router(static: ConsoleFiles) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/label/{feedback_set_id}")
    def label_page(feedback_set_id: str) -> Response:
        # The page is the same for every set: its script reads the id from the URL and asks the API (with the
        # key the annotator types) for everything else, so serving it needs no key and reveals nothing.
        del feedback_set_id
        return html(static.label_page)

    return router
