"""Shared fixtures: settings in a temp dir, the app in-process and over real HTTP, a tiny model and data.

Nothing here mocks a part that runs on this machine: the HTTP server is uvicorn on a free port, the
database a real SQLite file, the training a real child process.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

API_KEYS = {"tenant-a": "key-a", "tenant-b": "key-b"}


def require_or_skip(reason: str) -> NoReturn:
    """A service or tool the README says `make test` exercises (PostgreSQL, Redis, helm, hadolint, Chromium) is
    missing: skip on a developer's machine, but fail under CI=true, where a skip would let the suite pass
    without having tested what the README claims."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}: CI must provide it, not skip", pytrace=False)
    pytest.skip(reason)


# `make test` must stay under 10 minutes on 2 cores with the install (it runs under pytest-xdist). These long
# checks run in `make test-slow` instead (marked slow here, in one place, with why); each leaves a shorter test
# of the same path in `make test`. Durations: serial, on the quiet 2-core VM.
SLOW_IN_MAKE_TEST: dict[str, str] = {
    "tests/service/test_scale_out.py::test_two_process_sft_matches_one_process_loss_curve": (
        "24 s; the 2-process acceptance curves (sft, reward model, dpo, ppo, kill, pause) are all slow; the "
        "resources validation, capacity and launcher tests stay"
    ),
    "tests/service/test_child_dies_with_supervisor.py::"
    "test_sigkilled_server_takes_its_child_along_and_the_retry_runs_alone": (
        "40 s; the lifeline tests of the same file (broken lifeline, dead supervisor, thread exit) stay"
    ),
    "tests/service/test_idempotency.py::test_1000_concurrent_posts_with_one_key_make_one_job[postgresql]": (
        "18 s; the sqlite variant stays"
    ),
    "tests/service/test_feedback_active.py::test_judge_labels_beside_people": (
        "11 s; the judge's agreement and export rules stay in tests/unit/test_feedback.py"
    ),
    "tests/service/test_staging_sweep.py::"
    "test_killed_servers_staging_is_swept_at_next_start_but_not_a_folder_in_use": (
        "16 s; the sweep's in-use and naming tests stay"
    ),
    "tests/service/test_rlhf.py::test_rlhf_gate_stops_a_weak_reward_model_before_ppo": (
        "17 s; test_rlhf_end_to_end and the gate's unit tests (tests/unit/test_reward_gate.py) stay"
    ),
    "tests/service/test_scale_out.py::test_two_process_reward_model_matches_one_process_then_two_process_ppo_loads"
    "_with_peft": "84-104 s of five torch processes at once; the 2-process SFT curve test stays",
    "tests/service/test_scale_out.py::test_killed_rank_fails_the_attempt_and_the_job_resumes_from_its_checkpoint": (
        "62-68 s, two torchrun attempts; test_sigkilled_child_resumes_from_its_checkpoint and the SFT curve test stay"
    ),
    "tests/service/test_scale_out.py::test_cancel_stops_every_rank": "16 s; the SFT curve test stays",
    "tests/service/test_scale_out.py::test_fsdp_grpo_follows_ddp_and_an_fsdp_ppo_job_loads_with_peft": (
        "six jobs, five of them on 2 fsdp ranks; the resources validation test stays"
    ),
    "tests/service/test_scale_out.py::test_two_process_rlhf_runs_every_stage_on_two_processes[ddp]": (
        "three stages on two processes; test_rlhf_end_to_end and the 2-process SFT curve test stay"
    ),
    "tests/service/test_scale_out.py::test_two_process_rlhf_runs_every_stage_on_two_processes[fsdp]": (
        "three stages on two processes; test_rlhf_end_to_end and the 2-process SFT curve test stay"
    ),
    "tests/service/test_scale_out.py::test_two_process_grpo_and_rloo_jobs_succeed_and_load_with_peft": (
        "four torch processes at once; the grpo and rloo API tests stay"
    ),
    "tests/service/test_scale_out.py::test_pause_and_resume_a_two_process_job": (
        "41 s, two torchrun attempts; test_pause_keeps_every_step_and_resume_continues_from_it stays"
    ),
    "tests/training/test_distributed.py::test_fsdp_shards_the_layers_matches_one_process_and_its_checkpoints_resume"
    "_across_strategies": (
        "115-137 s and more, four runs (1 process, 2 fsdp ranks, resumed each way); the resources validation test "
        "(fsdp accepted for sft, refused with a judge grader and for 1 process) stays"
    ),
    "tests/service/test_scale_out.py::test_fsdp_reward_model_and_dpo_jobs_match_one_process_and_load_with_peft": (
        "75-90 s, four jobs (two of them 2 fsdp ranks); the resources validation test stays"
    ),
    "tests/training/test_distributed.py::test_a_one_process_checkpoint_resumes_on_two_processes_with_the_same_losses": (
        "28 s, two children; the 2-process SFT curve test over REST stays"
    ),
    "tests/service/test_scale_out.py::test_two_process_dpo_matches_one_process_loss_and_held_out_curves": (
        "30 s, two jobs; the SFT curve test runs the same shared loop"
    ),
    "tests/unit/test_gpu_check.py::test_cpu_smoke_runs_every_part": "35 s; the GPU check's plumbing on CPU",
    "tests/service/test_live_streams.py::test_streams_follow_a_real_job": (
        "22 s; the row-written stream tests on SQLite and PostgreSQL stay"
    ),
    "tests/faults/test_kills.py::test_kills_lose_and_duplicate_nothing": "60 s; make faults runs it at full size",
    "tests/faults/test_outages.py::test_postgres_crash_mid_run_is_503_then_recovers": "31 s; make faults too",
    "tests/faults/test_outages.py::test_s3_down_during_artifact_upload_is_retried": "25 s; make faults too",
    "tests/service/test_feedback_round.py::test_feedback_round_over_rest": "31 s; make demo runs a round too",
    "tests/service/test_feedback_active.py::test_uncertainty_ordering_refresh_and_judge": (
        "60 s (4 reward/score jobs); test_feedback_sets.py checks the ordering on known margins in make test"
    ),
    "tests/service/test_production.py::test_redis_restarted_empty_every_accepted_job_still_finishes": (
        "18 s; test_sigkilled_worker_job_finishes_on_a_new_worker_once stays"
    ),
    "tests/service/test_resume.py::test_rlhf_killed_in_ppo_resumes_ppo_from_its_checkpoint": (
        "17 s; test_sigkilled_child_resumes_from_its_checkpoint stays"
    ),
    "tests/client/test_sdk_evals.py::test_evals_create_retrieve_and_table": (
        "10 s; the CLI test runs an evaluate job through the SDK"
    ),
    "tests/training/test_ppo.py::test_ppo_learns_to_end_answers_with_bounded_kl": "14 s; a learning check",
    "tests/training/test_ppo.py::test_ppo_against_a_reward_model_adapter": (
        "12 s; test_child_end_to_end_with_a_reward_model_folder stays"
    ),
    "tests/service/test_bom_datasets.py::test_reward_model_and_ppo_jobs_train_on_bom_preference_and_prompts": (
        "14 s; the SFT, ranking and generate BOM tests stay"
    ),
    "tests/service/test_ppo_guards.py::test_weak_reward_model_refused_then_allowed_and_a_monitor_stops_the_job": (
        "13 s; the rlhf gate test and the PPO monitor tests stay"
    ),
    "tests/client/test_sdk_install.py::test_client_installs_alone_without_server_dependencies": (
        "11 s of pip; the boundaries test checks the client's imports"
    ),
    "tests/service/test_rlhf.py::test_rlhf_gate_needs_a_held_out_set": "7 s; the weak-reward-model gate test stays",
    "tests/service/test_rlhf.py::test_rlhf_runs_grpo_last_by_default_and_evaluates_it": "11 s; test_rlhf_end_to_end stays",
    "tests/service/test_idempotency.py::test_1000_concurrent_posts_with_one_key_make_one_job[sqlite]": (
        "8 s; the PostgreSQL run stays"
    ),
    "tests/training/test_grpo.py::test_kl_stays_bounded_with_beta": "10 s; a learning check",
    "tests/service/test_ppo_eval_rest.py::test_rlhf_ppo_stage_reports_held_out_eval_series": (
        "9 s; test_rlhf_end_to_end and tests/training/test_ppo_eval.py stay"
    ),
    "tests/service/test_jobs.py::test_sft_job_end_to_end[http]": "8 s; in-process and http-postgresql stay",
    "tests/service/test_openai_api.py::test_a_dpo_job_continues_from_the_fine_tuned_model": (
        "10 s of a third training child; the facade's supervised and reinforcement jobs, its dpo file checks and "
        "tests/unit/test_openai_mapping.py stay"
    ),
    # Moved on 2026-12-02: on that session's VM (2 cores, fp32 matmul 93 GFLOP/s against 214-263 on the earlier
    # ones) a fresh-clone make test took 22 min; these were the longest left (seconds measured there, under
    # the suite's load).
    "tests/training/test_precision.py::test_ppo_in_bf16_keeps_the_first_ratio_at_one_and_learns_to_end": (
        "112 s: bf16 is emulated on a CPU without AMX; a learning check; the file's other bf16 tests stay"
    ),
    "tests/service/test_scale_out.py::test_bf16_reward_model_and_ppo_jobs_follow_the_fp32_curve_and_load_with_peft": (
        "76 s of emulated bf16; tests/training/test_precision.py's unit checks stay"
    ),
    "tests/service/test_feedback_active.py::test_a_fine_tuned_judge_labels_beside_people_and_its_agreement_is_"
    "reported": "42 s, three training jobs; the judge's agreement and export rules stay in tests/unit",
    "tests/service/test_api_keys.py::test_cli_key_authenticates_is_listed_without_its_secret_and_revoked_at_once"
    "[postgresql]": "39 s of CLI processes; the SQLite variant stays",
    "tests/service/test_console.py::test_compare_two_runs_and_download_an_artifact": (
        "66 s with its two training jobs; the console's sign-in, watch and evaluation tests stay"
    ),
    "tests/training/test_grpo.py::test_learns_to_end_answers_on_held_out_prompts[rloo]": (
        "17 s, a learning check; the grpo variant and the leave-one-out unit tests stay"
    ),
    "tests/service/test_console.py::test_pause_resume_and_cancel_a_running_job": (
        "30 s in the browser; tests/service/test_pause_resume.py pauses, resumes and cancels over REST"
    ),
    "tests/service/test_console.py::test_try_it_asks_two_models": (
        "20-30 s of two chat jobs; the console's other browser tests stay"
    ),
    "tests/service/test_api_keys.py::test_cli_key_authenticates_is_listed_without_its_secret_and_revoked_at_once"
    "[sqlite]": "8 s; the PostgreSQL run stays",
}


@pytest.hookimpl(tryfirst=True)  # before the -m 'not slow' deselection
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid in SLOW_IN_MAKE_TEST:
            item.add_marker(pytest.mark.slow)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_settings(data_dir: Path, **overrides: Any) -> Any:
    from service.settings import Settings

    values: dict[str, Any] = {
        "data_dir": data_dir,
        "api_keys": ",".join(f"{tenant}:{key}" for tenant, key in API_KEYS.items()),
        "cancel_grace_seconds": 3.0,
        "torch_threads": 1,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.tiny_model import shared_tiny_llama

    return shared_tiny_llama(tmp_path_factory.getbasetemp(), "tiny-llama0", seed=0)


@pytest.fixture(scope="session")
def sft_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.tiny_model import tiny_sft_jsonl

    return tiny_sft_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", n=48)


class UvicornThread:
    """uvicorn serving an app on 127.0.0.1:<free port> in a background thread (lifespan included)."""

    def __init__(self, app: Any) -> None:
        import socket

        import uvicorn

        # The socket is bound here and handed to uvicorn: a port picked free and bound later can be taken in
        # between by another xdist worker (seen once: "address already in use" in a fresh-clone make test).
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = int(self.socket.getsockname()[1])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


@dataclass
class LiveServer:
    base_url: str
    api_key: str
    other_api_key: str
    data_dir: Path
    tiny_model_dir: Path
    sft_jsonl: Path
    settings: Any

    def client(self, api_key: str | None = None, **kwargs: Any) -> httpx.Client:
        key = self.api_key if api_key is None else api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kwargs)


@pytest.fixture
def live_server(tmp_path: Path, tiny_model_dir: Path, sft_jsonl: Path) -> Iterator[LiveServer]:
    """A real alignd server (embedded mode, auth on with two tenants) on a free port."""
    from alignd_server.embedded import create_app

    settings = make_settings(tmp_path / "alignd")
    with UvicornThread(create_app(settings)) as server:
        yield LiveServer(
            base_url=server.base_url,
            api_key=API_KEYS["tenant-a"],
            other_api_key=API_KEYS["tenant-b"],
            data_dir=settings.data_dir,
            tiny_model_dir=tiny_model_dir,
            sft_jsonl=sft_jsonl,
            settings=settings,
        )


@pytest.fixture(params=["in-process", "http", "http-postgresql"])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[httpx.Client]:
    """The same API three ways: FastAPI's in-process TestClient and real HTTP to uvicorn on SQLite, and real
    HTTP on PostgreSQL (a fresh database per test, dropped afterwards). Tenant A's key."""
    from fastapi.testclient import TestClient

    from alignd_server.embedded import create_app

    with contextlib.ExitStack() as stack:
        overrides: dict[str, Any] = {}
        if request.param.endswith("postgresql"):
            overrides["database_url"] = stack.enter_context(pg_database())
        settings = make_settings(tmp_path / "alignd", **overrides)
        app = create_app(settings)
        headers = {"Authorization": f"Bearer {API_KEYS['tenant-a']}"}
        if request.param == "in-process":
            client: httpx.Client = stack.enter_context(TestClient(app, headers=headers))
        else:
            server = stack.enter_context(UvicornThread(app))
            client = stack.enter_context(httpx.Client(base_url=server.base_url, headers=headers, timeout=60))
        client.app_settings = settings  # type: ignore[attr-defined]
        yield client


# ---------------------------------------------------------------------------------------------------------
# Production-mode services: PostgreSQL databases, a private redis-server, moto S3, TCP proxies for outages.
# ---------------------------------------------------------------------------------------------------------

PG_ADMIN_DSNS = (
    "postgresql://postgres@127.0.0.1:5432/postgres",
    "postgresql://postgres@127.0.0.1:5432/test",
    "postgresql://root@127.0.0.1:5432/postgres",
    "postgresql://root@127.0.0.1:5432/test",
)
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _pg_admin() -> Any:
    import psycopg

    errors = []
    for dsn in PG_ADMIN_DSNS:
        try:
            return psycopg.connect(dsn, autocommit=True, connect_timeout=3)
        except psycopg.OperationalError as exc:
            errors.append(f"{dsn}: {exc}")
    require_or_skip("no PostgreSQL at 127.0.0.1:5432: " + "; ".join(errors))


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A fresh database ``alignd_test_<random>``; yields its SQLAlchemy URL, drops it afterwards."""
    name = f"alignd_test_{secrets.token_hex(6)}"
    with _pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        user = admin.info.user
        try:
            yield f"postgresql+psycopg://{user}@127.0.0.1:5432/{name}"
        finally:
            # FORCE: a test that failed half-way may have left connections open.
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg_database() as url:
        yield url


class RedisServer:
    """A private, non-persistent redis-server on a free port that tests may stop and start (empty)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()  # no SHUTDOWN SAVE: it comes back empty
            self.process.wait()
            self.process = None

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        require_or_skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a backend; stop() refuses new connections and cuts open ones.

    Lets a test take PostgreSQL or S3 "down" and bring it back with its state intact.
    """

    def __init__(self, backend_port: int, port: int | None = None) -> None:
        self.backend_port = backend_port
        self.port = port or free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.backend_port), 5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture(scope="session")
def aws_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Credentials for moto through the standard AWS chain (also inherited by worker processes)."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in AWS_TEST_ENV.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        nothing = tmp_path_factory.mktemp("aws-conf") / "absent"
        mp.setenv("AWS_CONFIG_FILE", str(nothing))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nothing))
        yield dict(AWS_TEST_ENV, AWS_CONFIG_FILE=str(nothing), AWS_SHARED_CREDENTIALS_FILE=str(nothing))


@pytest.fixture(scope="session")
def moto_s3(aws_env: dict[str, str]) -> Iterator[str]:
    """moto's S3 server (real HTTP) on a free port; yields its endpoint URL. Tests make their own buckets."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def make_bucket(endpoint_url: str) -> str:
    import boto3
    from botocore.config import Config

    name = f"alignd-{secrets.token_hex(6)}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
    )
    client.create_bucket(Bucket=name)
    return name


class WorkerProcess:
    """``alignd-server worker`` as a real process in its own process group (so a test can SIGKILL it all)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "alignd_server.cli", "worker"],
                env=env,
                cwd=root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def stop(self, timeout: float = 60) -> int | None:
        if self.process is None:
            return None
        self.kill(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            return self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class ProductionStack:
    """API (uvicorn in this process, arq mode) + PostgreSQL database + private Redis + moto S3 bucket."""

    base_url: str
    settings: Any
    redis: RedisServer
    s3_endpoint: str
    bucket: str
    worker_env: dict[str, str]
    tmp_path: Path
    workers: list[WorkerProcess]

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {API_KEYS['tenant-a']}"},
            timeout=60,
            **kwargs,
        )

    def start_worker(self, **env: str) -> WorkerProcess:
        index = len(self.workers)
        data_dir = self.tmp_path / f"worker-{index}"
        worker = WorkerProcess(
            {**self.worker_env, "ALIGND_DATA_DIR": str(data_dir), **env},
            self.tmp_path / f"worker-{index}.log",
        ).start()
        self.workers.append(worker)
        return worker


def production_env(
    *, data_dir: Path, database_url: str, redis_url: str, s3_endpoint: str, bucket: str
) -> dict[str, str]:
    """ALIGND_* for production mode with test timings (short lease, fast reconciler)."""
    return {
        "ALIGND_DATA_DIR": str(data_dir),
        "ALIGND_DATABASE_URL": database_url,
        "ALIGND_QUEUE": "arq",
        "ALIGND_REDIS_URL": redis_url,
        "ALIGND_STORAGE_URL": f"s3://{bucket}/alignd",
        "ALIGND_S3_ENDPOINT_URL": s3_endpoint,
        "ALIGND_S3_PRESIGN": "true",
        "ALIGND_API_KEYS": ",".join(f"{tenant}:{key}" for tenant, key in API_KEYS.items()),
        # Short enough for the SIGKILL test, long enough for a loaded 2-core box: the runner heartbeats from
        # its relay loop, which blocks while it uploads an artifact or checkpoint.
        "ALIGND_LEASE_SECONDS": "8",
        "ALIGND_HEARTBEAT_SECONDS": "0.5",
        "ALIGND_RECONCILE_INTERVAL_SECONDS": "0.5",
        "ALIGND_DB_RETRY_SECONDS": "0.5",
        "ALIGND_TORCH_THREADS": "1",
        "ALIGND_CANCEL_GRACE_SECONDS": "3",
        "ALIGND_LOG_JSON": "true",
        "ALIGND_WORKER_CONCURRENCY": "1",
    }


@pytest.fixture
def production_stack(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, moto_s3: str, aws_env: dict[str, str]
) -> Iterator[ProductionStack]:
    from service.api.app import create_app
    from service.settings import Settings

    bucket = make_bucket(moto_s3)
    env = production_env(
        data_dir=tmp_path / "api",
        database_url=pg_url,
        redis_url=redis_server.url,
        s3_endpoint=moto_s3,
        bucket=bucket,
    )
    settings = Settings(**{key.removeprefix("ALIGND_").lower(): value for key, value in env.items()})
    stack: ProductionStack | None = None
    with UvicornThread(create_app(settings)) as server:
        stack = ProductionStack(
            base_url=server.base_url,
            settings=settings,
            redis=redis_server,
            s3_endpoint=moto_s3,
            bucket=bucket,
            worker_env={**env, **aws_env, "ALIGND_WORKER_METRICS_PORT": "0"},
            tmp_path=tmp_path,
            workers=[],
        )
        try:
            yield stack
        finally:
            for worker in stack.workers:
                worker.stop(timeout=30)
