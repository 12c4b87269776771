"""docs/deploy.md against the code: the settings table is generated from Settings and must be current."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy.deploy_support import CHART
from tests.deploy.settings_table import CHART as CHART_PATHS
from tests.deploy.settings_table import DOC, current, render


def test_settings_table_is_generated_from_settings():
    assert current() == render(), "run: python -m tests.deploy.settings_table --write"


def test_every_setting_is_in_the_doc():
    settings = pytest.importorskip("service.settings")
    text = DOC.read_text()
    missing = [
        f"ALIGND_{name.upper()}"
        for name in settings.Settings.model_fields
        if f"`ALIGND_{name.upper()}`" not in text
    ]
    assert not missing, missing
    assert set(CHART_PATHS) == set(settings.Settings.model_fields), "map new settings to the chart"


def test_chart_paths_named_in_the_table_exist():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for where in CHART_PATHS.values():
        for path in re.findall(r"`((?:config|worker)\.[A-Za-z.]+)`", where):
            node = values
            for part in path.split("."):
                assert isinstance(node, dict) and part in node, path
                node = node[part]


def test_doc_covers_production_mode():
    text = DOC.read_text()
    for needle in (
        "alignd:queue:<method>",
        "ALIGND_WORKER_METHODS",
        "fencing",
        "reconciler",
        "ALIGND_JOB_MAX_TRIES",
        "checkpoint",
        "/metrics",
        "ALIGND_LOG_JSON",
        "standard AWS chain",
        "presigned",
        "202",
        "worker --check",
        "no Docker engine",
        "no Kubernetes cluster",
    ):
        assert needle in text, needle
