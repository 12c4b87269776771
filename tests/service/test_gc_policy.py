"""The API's collector policy (service/api/gc_policy.py): what start-up allocated is frozen while the app
serves, young garbage is still collected, and shutdown gives the process its collector back."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from fastapi.testclient import TestClient

from tests.conftest import make_settings


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_startup_heap_is_frozen_while_serving_and_released_at_shutdown(tmp_path: Path) -> None:
    from alignd_server.embedded import create_app

    threshold_before = gc.get_threshold()
    frozen_before = gc.get_freeze_count()  # 0 unless another app in this process is serving
    with TestClient(create_app(make_settings(tmp_path / "alignd"))) as client:
        assert client.get("/healthz").status_code == 200
        # the imported modules, routes and models: tens of thousands of objects out of the full collections
        assert gc.get_freeze_count() > frozen_before + 10_000
        assert gc.get_threshold() == threshold_before  # the interpreter's thresholds are kept
        # a reference cycle made after start-up is still garbage the collector finds
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
    assert gc.get_freeze_count() == 0  # unfreeze releases the whole permanent generation
    assert gc.get_threshold() == threshold_before


def test_gc_freeze_off_leaves_the_collector_alone(tmp_path: Path) -> None:
    from alignd_server.embedded import create_app

    threshold_before = gc.get_threshold()
    frozen_before = gc.get_freeze_count()
    settings = make_settings(tmp_path / "alignd", gc_freeze=False)
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_freeze_count() == frozen_before
        assert gc.get_threshold() == threshold_before
