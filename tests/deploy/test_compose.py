"""examples/compose.yaml: parsed and checked for structure only (no Docker engine here to run it)."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy.deploy_support import REPO

COMPOSE = REPO / "examples" / "compose.yaml"


def load() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # also resolves the x-* anchors and << merges


def test_compose_parses_with_all_services():
    services = load()["services"]
    assert {"postgres", "redis", "minio", "minio-init", "migrate", "api", "worker"} <= set(services)


def test_alignd_services_share_one_image_and_hardening():
    s = load()["services"]
    for name in ("migrate", "api", "worker"):
        svc = s[name]
        assert svc["image"] == "alignd:trial"
        assert svc["build"]["context"] == ".."
        assert svc["user"] == "10001:10001"
        assert svc["read_only"] is True
        assert svc["cap_drop"] == ["ALL"]
        env = svc["environment"]
        assert env["ALIGND_QUEUE"] == "arq"
        assert env["ALIGND_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["ALIGND_STORAGE_URL"].startswith("s3://")
        assert env["ALIGND_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert s["migrate"]["command"] == ["migrate"]
    assert s["api"]["command"][:1] == ["serve"]
    assert s["worker"]["command"] == ["worker"]
    assert s["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert s["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert s["worker"]["environment"]["ALIGND_WORKER_METRICS_PORT"] == "9100"


def test_no_hardcoded_passwords():
    # every password / key comes from a required variable: ${VAR:?message}
    checked = 0
    for name, svc in load()["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|API_KEYS|SECRET_ACCESS_KEY|_AUTH$", key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)), (name, key)
                checked += 1
            if key.endswith("_URL") and "@" in str(value):
                assert re.search(r":\$\{\w+:\?[^}]*\}@", str(value)), (name, key)
    assert checked >= 8


def test_worker_methods_and_metrics_port_match_the_server():
    jobs = pytest.importorskip("contract.methods")
    worker = load()["services"]["worker"]
    env = worker["environment"]
    assert env["ALIGND_WORKER_METHODS"].split(",") == [m.value for m in jobs.Method]
    port = env["ALIGND_WORKER_METRICS_PORT"]
    assert env["HEALTHCHECK_URL"] == f"http://127.0.0.1:{port}/metrics"
    assert f"127.0.0.1:{port}:{port}" in worker["ports"]
    # the API serves /metrics on its own port: nothing extra to publish
    assert "127.0.0.1:8000:8000" in load()["services"]["api"]["ports"]
