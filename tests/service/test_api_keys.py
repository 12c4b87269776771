"""API keys in the database: made, listed and revoked with the real ``alignd-server keys`` command (a
subprocess against the same SQLite file or PostgreSQL database as the server), used over real HTTP against
a uvicorn server, beside ALIGND_API_KEYS's keys."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from tests.conftest import API_KEYS, UvicornThread, free_port, make_settings, pg_database
from tests.service.helpers import assert_error, jsonl, upload_dataset

ROOT = Path(__file__).resolve().parents[2]
SFT = jsonl([{"prompt": "2+2=", "completion": "4"}])


def _server_command() -> list[str]:
    script = Path(sys.executable).parent / "alignd-server"  # the console script pip installed
    return [str(script)] if script.exists() else [sys.executable, "-m", "alignd_server.cli"]


@dataclass
class KeyServer:
    """A running embedded server and the environment under which ``alignd-server`` reaches its database."""

    base_url: str
    env: dict[str, str]
    settings: Any

    def cli(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*_server_command(), "keys", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == expect, (done.returncode, done.stdout, done.stderr)
        return done

    def create(self, tenant: str, *more: str) -> dict[str, Any]:
        created: dict[str, Any] = json.loads(self.cli("create", "--tenant", tenant, *more, "--json").stdout)
        return created

    def listed(self, *more: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self.cli("list", "--json", *more).stdout)
        return rows

    def client(self, secret: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)


def _cli_env(data_dir: Path, database_url: str | None, api_keys: str | None) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("ALIGND_")}
    env["ALIGND_DATA_DIR"] = str(data_dir)
    if database_url is not None:
        env["ALIGND_DATABASE_URL"] = database_url
    if api_keys is not None:
        env["ALIGND_API_KEYS"] = api_keys
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@contextlib.contextmanager
def key_server(tmp_path: Path, *, database_url: str | None, env_keys: bool) -> Iterator[KeyServer]:
    from alignd_server.embedded import create_app

    overrides: dict[str, Any] = {"database_url": database_url}
    if not env_keys:
        overrides["api_keys"] = None
    settings = make_settings(tmp_path / "alignd", **overrides)
    api_keys = settings.api_keys.get_secret_value() if settings.api_keys is not None else None
    with UvicornThread(create_app(settings)) as server:
        yield KeyServer(server.base_url, _cli_env(settings.data_dir, database_url, api_keys), settings)


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyServer]:
    """ALIGND_API_KEYS's two tenants plus whatever keys a test makes in the database."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(pg_database()) if request.param == "postgresql" else None
        yield stack.enter_context(key_server(tmp_path, database_url=url, env_keys=True))


def test_cli_key_authenticates_is_listed_without_its_secret_and_revoked_at_once(server: KeyServer) -> None:
    created = server.create("tenant-a", "--name", "ci runner")
    secret = created["secret"]
    assert secret.startswith("ak_live_") and len(secret) >= 40
    assert created["id"].startswith("key_") and created["prefix"] == secret[:12]
    assert (created["tenant"], created["name"], created["last_used_at"], created["revoked_at"]) == (
        "tenant-a",
        "ci runner",
        None,
        None,
    )

    with server.client(secret) as client:
        dataset = upload_dataset(client, SFT, "sft")
        assert dataset.status_code == 201, dataset.text
        assert client.get(f"/v1/datasets/{dataset.json()['id']}").status_code == 200
    # The database key and ALIGND_API_KEYS's key of the same tenant see the same resources.
    with server.client(API_KEYS["tenant-a"]) as client:
        assert client.get(f"/v1/datasets/{dataset.json()['id']}").status_code == 200

    [row] = server.listed()
    assert row["id"] == created["id"] and row["last_used_at"] is not None
    assert row["last_used_at"] >= created["created_at"] and "secret" not in row
    table = server.cli("list").stdout
    for shown in (created["id"], "tenant-a", "ci runner", created["prefix"], "LAST USED", "REVOKED"):
        assert shown in table
    stored_hash = hashlib.sha256(secret.encode()).hexdigest()
    for output in (table, json.dumps(server.listed())):
        assert secret not in output and secret[12:] not in output and stored_hash not in output

    revoked = server.cli("revoke", created["id"]).stdout
    assert created["id"] in revoked and "revoked" in revoked
    with server.client(secret) as client:
        assert_error(client.get("/v1/datasets"), 401, "api_key_revoked")
    assert server.listed()[0]["revoked_at"] is not None
    assert "already revoked" in server.cli("revoke", created["id"]).stdout
    # ALIGND_API_KEYS's keys keep working beside the database's.
    for key in API_KEYS.values():
        with server.client(key) as client:
            assert client.get("/v1/datasets").status_code == 200


def test_another_tenants_key_sees_404s(tmp_path: Path) -> None:
    with key_server(tmp_path, database_url=None, env_keys=True) as server:
        key_a = server.create("team-a")["secret"]
        key_b = server.create("team-b")["secret"]
        with server.client(key_a) as client:
            dataset_id = upload_dataset(client, SFT, "sft").json()["id"]
        with server.client(key_b) as client:
            assert_error(client.get(f"/v1/datasets/{dataset_id}"), 404, "dataset_not_found")
            assert_error(client.delete(f"/v1/datasets/{dataset_id}"), 404, "dataset_not_found")
            assert client.get("/v1/datasets").json()["data"] == []
        with server.client(key_a) as client:
            assert client.get(f"/v1/datasets/{dataset_id}").status_code == 200
        assert [row["tenant"] for row in server.listed("--tenant", "team-b")] == ["team-b"]


def test_wrong_and_malformed_keys_are_401(tmp_path: Path) -> None:
    with key_server(tmp_path, database_url=None, env_keys=False) as server:
        secret = server.create("team-a")["secret"]
        cases = {
            None: "missing_api_key",
            "ak_live_" + "x" * 43: "invalid_api_key",  # the shape of a key, but none was made
            secret[:-1]: "invalid_api_key",
            "not-a-database-key": "invalid_api_key",
            "ak_live_" + "x" * 500: "invalid_api_key",  # longer than any secret: never hashed or queried
        }
        for presented, code in cases.items():
            with server.client(presented) as client:
                assert_error(client.get("/v1/datasets"), 401, code)
        with server.client(secret) as client:
            assert client.get("/v1/datasets").status_code == 200


def test_without_env_keys_the_first_database_key_turns_auth_on_for_good(tmp_path: Path) -> None:
    with key_server(tmp_path, database_url=None, env_keys=False) as server:
        # Neither ALIGND_API_KEYS nor a database key: single-tenant embedded mode, as before.
        with server.client(None) as anonymous:
            dataset_id = upload_dataset(anonymous, SFT, "sft").json()["id"]
            created = server.create("default", "--name", "laptop")
            # The server asks again at most every second while it knows of no key; poll, then it holds.
            deadline = time.monotonic() + 30
            while anonymous.get("/v1/datasets").status_code != 401:
                assert time.monotonic() < deadline, "the new key was never enforced"
                time.sleep(0.1)
            assert_error(anonymous.get(f"/v1/datasets/{dataset_id}"), 401, "missing_api_key")
        # A key for the default tenant reaches what the unauthenticated server made.
        with server.client(created["secret"]) as client:
            assert client.get(f"/v1/datasets/{dataset_id}").status_code == 200
        server.cli("revoke", created["id"])
        # Revoking the last key does not switch authentication off.
        with server.client(None) as anonymous:
            assert_error(anonymous.get("/v1/datasets"), 401, "missing_api_key")
        with server.client(created["secret"]) as client:
            assert_error(client.get("/v1/datasets"), 401, "api_key_revoked")


def test_last_used_is_written_at_most_once_a_minute(tmp_path: Path) -> None:
    from service.db.api_keys import LAST_USED_RESOLUTION_SECONDS, TABLE, list_keys
    from service.db.session import make_engine

    with key_server(tmp_path, database_url=None, env_keys=True) as server:
        created = server.create("team-a")
        engine = make_engine(server.settings.resolved_database_url)

        def last_used() -> int | None:
            return list_keys(engine)[0].last_used_at

        def set_last_used(value: int) -> None:
            with engine.begin() as connection:
                connection.execute(update(TABLE).values(last_used_at=value))

        with server.client(created["secret"]) as client:
            assert client.get("/v1/datasets").status_code == 200
            first = last_used()
            assert first is not None
            # A use recorded less than a minute ago is left as it is...
            recent = first - (LAST_USED_RESOLUTION_SECONDS - 20)
            set_last_used(recent)
            for _ in range(3):
                assert client.get("/v1/datasets").status_code == 200
            assert last_used() == recent
            # ...one a minute old is replaced by this use's time.
            set_last_used(first - LAST_USED_RESOLUTION_SECONDS - 1)
            assert client.get("/v1/datasets").status_code == 200
            latest = last_used()
            assert latest is not None and latest >= first
        engine.dispose()


def test_record_use_condition_holds_across_callers(tmp_path: Path) -> None:
    from service.db.api_keys import create_key, list_keys, record_use
    from service.db.session import make_engine, migrate

    engine = make_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    migrate(engine)
    row, _secret = create_key(engine, tenant="team-a")
    # Two replicas seeing the key in the same second: one writes.
    assert [record_use(engine, row.id, at=1000), record_use(engine, row.id, at=1000)] == [True, False]
    assert record_use(engine, row.id, at=1059) is False
    assert record_use(engine, row.id, at=1060) is True
    assert list_keys(engine)[0].last_used_at == 1060
    engine.dispose()


def test_stored_is_the_hash_not_the_secret(tmp_path: Path) -> None:
    from service.db.api_keys import create_key, find_key
    from service.db.session import make_engine, migrate

    database = tmp_path / "keys.db"
    engine = make_engine(f"sqlite:///{database}")
    migrate(engine)
    row, secret = create_key(engine, tenant="team-a", name="n")
    assert row.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    engine.dispose()  # every page on disk: the WAL checkpointed into the file
    assert secret.encode() not in database.read_bytes()
    engine = make_engine(f"sqlite:///{database}")
    match = find_key(engine, secret)
    assert match is not None and (match.key_id, match.tenant, match.revoked) == (row.id, "team-a", False)
    assert find_key(engine, secret + "x") is None
    engine.dispose()


def test_an_unreachable_database_is_503_never_the_default_tenant() -> None:
    from service.api.auth import DatabaseKeys, resolve_tenant
    from service.core.errors import ServiceUnavailableError
    from service.db.session import make_engine

    engine = make_engine(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none?connect_timeout=2")
    keys = DatabaseKeys(engine)
    # Asked twice: a failed check is not remembered as "no keys" (which would let callers in unauthenticated).
    for _ in range(2):
        with pytest.raises(ServiceUnavailableError) as raised:
            asyncio.run(resolve_tenant(None, {}, keys))
        assert raised.value.code == "database_unavailable" and raised.value.status == 503
    # With ALIGND_API_KEYS set, their keys never touch the database; a database key needs it (503).
    assert asyncio.run(resolve_tenant("Bearer key-a", {"key-a": "tenant-a"}, keys)) == "tenant-a"
    with pytest.raises(ServiceUnavailableError):
        asyncio.run(resolve_tenant("Bearer ak_live_" + "x" * 43, {"key-a": "tenant-a"}, keys))
    engine.dispose()


def test_cli_refusals(tmp_path: Path) -> None:
    env = _cli_env(tmp_path / "fresh", None, None)
    run = [*_server_command(), "keys"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*run, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)

    unmigrated = cli("list")
    assert unmigrated.returncode == 1 and "alignd-server migrate" in unmigrated.stderr
    migrated = subprocess.run(
        [*_server_command(), "migrate"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert migrated.returncode == 0, migrated.stderr
    for bad_tenant in ("", "a b", "a:b", "a,b", "x" * 129):
        refused = cli("create", "--tenant", bad_tenant)
        assert refused.returncode == 2 and "tenant" in refused.stderr and not refused.stdout
    assert cli("create", "--tenant", "t", "--name", "").returncode == 2
    unknown = cli("revoke", "key_unknown")
    assert unknown.returncode == 1 and "key_unknown" in unknown.stderr
    assert json.loads(cli("list", "--json").stdout) == []


def test_serve_on_a_public_interface_needs_a_key_from_somewhere(tmp_path: Path) -> None:
    env = _cli_env(tmp_path / "alignd", None, None)
    port = str(free_port())
    serve = [*_server_command(), "serve", "--host", "0.0.0.0", "--port", port]
    refused = subprocess.run(serve, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "alignd-server keys create" in refused.stderr
    subprocess.run([*_server_command(), "migrate"], env=env, cwd=ROOT, check=True, capture_output=True)
    keys = [*_server_command(), "keys", "create", "--tenant", "team-a", "--json"]
    secret = json.loads(subprocess.run(keys, env=env, cwd=ROOT, check=True, capture_output=True).stdout)[
        "secret"
    ]
    with subprocess.Popen(
        serve, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as process:
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while True:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                        break
                assert time.monotonic() < deadline, "serve did not become ready"
                time.sleep(0.2)
            assert_error(httpx.get(base + "/v1/datasets", timeout=10), 401, "missing_api_key")
            headers = {"Authorization": f"Bearer {secret}"}
            assert httpx.get(base + "/v1/datasets", headers=headers, timeout=10).status_code == 200
        finally:
            process.terminate()
            process.wait(30)
