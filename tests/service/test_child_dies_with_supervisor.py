"""The training child never outlives its supervisor, so no attempt of a job runs twice.

Real processes throughout: `alignd-server serve` in a subprocess running a real SFT job on the tiny model,
SIGKILLed while its child starts up (importing torch, loading the model: silent, so a broken stdout pipe
would not stop it for many seconds); then the lifeline pipe, the spawner thread and the start-up check
(workers/training/lifeline.py) one by one against real child processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.helpers import upload_dataset, upload_model, wait_for
from tests.service.server_process import ROOT, ServerProcess
from workers.training.lifeline import EXIT_SUPERVISOR_LOST, LIFELINE_FD_ENV, SUPERVISOR_PID_ENV

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

TERMINAL = {"succeeded", "failed", "cancelled"}


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for its new parent to reap it is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _training_children(job_id: str) -> set[int]:
    """Live `python -m workers.training` processes of ``job_id`` (their spec path names the job)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = b"workers.training" in argv and any(job_id.encode() in arg for arg in argv)
        if ours and _running(int(entry.name)):
            found.add(int(entry.name))
    return found


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    try:
        yield started
    finally:
        for server in started:
            server.stop()


def _child_pids(client: httpx.Client, job_id: str) -> list[int]:
    events = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
    return [
        int(found.group(1))
        for event in events
        if (found := re.search(r"Training process started \(pid (\d+)\)", event["message"]))
    ]


def _sft_job(client: httpx.Client, tiny_model_dir: Path, sft_jsonl: Path) -> str:
    model = upload_model(client, tiny_model_dir).json()["id"]
    dataset = upload_dataset(client, sft_jsonl, "sft").json()["id"]
    response = client.post(
        "/v1/jobs",
        json={
            "method": "sft",
            "base_model": model,
            "datasets": {"sft": dataset},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "hyperparameters": {
                "epochs": 100,
                "max_steps": 40,
                "batch_size": 4,
                "learning_rate": 1e-3,
                "max_length": 48,
                "checkpoint_steps": 10,
            },
            "seed": 1,
        },
    )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def test_sigkilled_server_takes_its_child_along_and_the_retry_runs_alone(
    servers: list[ServerProcess], tmp_path: Path, tiny_model_dir: Path, sft_jsonl: Path
) -> None:
    data_dir = tmp_path / "alignd"
    first = ServerProcess(data_dir, tmp_path / "server-1.log")
    servers.append(first)
    with first.client() as client:
        job_id = _sft_job(client, tiny_model_dir, sft_jsonl)
        deadline = time.monotonic() + 120
        while not (pids := _child_pids(client, job_id)):
            assert time.monotonic() < deadline, client.get(f"/v1/jobs/{job_id}/events").json()
            time.sleep(0.05)
    old_child = pids[0]
    assert _running(old_child)

    # The server dies the way the OOM killer kills it: no shutdown, no SIGTERM to the child's group.
    first.process.kill()
    first.process.wait()
    killed_at = time.monotonic()
    try:
        while _running(old_child) and time.monotonic() - killed_at < 3:
            time.sleep(0.05)
        assert not _running(old_child), "the training child outlived its SIGKILLed server"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(old_child, signal.SIGKILL)  # never leave it behind, even when the test fails

    # The restarted server's reconciler finds the lapsed lease and runs attempt 2: only ever one child.
    second = ServerProcess(data_dir, tmp_path / "server-2.log")
    servers.append(second)
    seen: set[int] = set()
    most_at_once = 0
    with second.client() as client:
        deadline = time.monotonic() + 240
        while (status := client.get(f"/v1/jobs/{job_id}").json()["status"]) not in TERMINAL:
            assert time.monotonic() < deadline, f"job still {status}"
            children = _training_children(job_id)
            seen |= children
            most_at_once = max(most_at_once, len(children))
            time.sleep(0.05)
        done = wait_for(client, job_id, TERMINAL)
        assert done["status"] == "succeeded", done
        pids = _child_pids(client, job_id)
        messages = [e["message"] for e in client.get(f"/v1/jobs/{job_id}/events").json()["data"]]
    assert most_at_once == 1, seen
    assert old_child not in seen
    assert len(pids) == 2 and pids[1] in seen, (pids, seen)
    assert any("(attempt 2)" in m for m in messages), messages
    assert messages.count("Job succeeded.") == 1


def _python(code: str, **popen: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **popen.pop("env", {})}
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


BOUND_CHILD = (
    "import os, time\n"
    "from workers.training.lifeline import bind_to_supervisor\n"
    "assert bind_to_supervisor(os.environ) is None\n"
    "print('bound', flush=True)\n"
    "time.sleep(120)\n"
)


# A child whose training loop ignores the SIGTERM the lifeline sends first, with a grandchild of its own.
STUBBORN_CHILD = (
    "import os, signal, subprocess, time\n"
    "from workers.training.lifeline import bind_to_supervisor\n"
    "signal.signal(signal.SIGTERM, lambda *_: None)\n"
    "grandchild = subprocess.Popen(['sleep', '120'])\n"
    "assert bind_to_supervisor(os.environ) is None\n"
    "print(grandchild.pid, flush=True)\n"
    "time.sleep(120)\n"
)


def test_a_broken_lifeline_ends_the_child_and_its_group(tmp_path: Path) -> None:
    """The portable guard alone: this test process is the supervisor and stays alive; it only closes its end
    of the pipe (what its death would do). The child ignores SIGTERM, so after the grace it kills its own
    process group, grandchild included."""
    lifeline_read, lifeline_write = os.pipe()
    child = _python(
        STUBBORN_CHILD,
        env={SUPERVISOR_PID_ENV: str(os.getpid()), LIFELINE_FD_ENV: str(lifeline_read)},
        pass_fds=(lifeline_read,),
        start_new_session=True,
    )
    os.close(lifeline_read)
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        time.sleep(0.5)
        assert child.poll() is None  # a lifeline that holds keeps it running
        os.close(lifeline_write)
        closed_at = time.monotonic()
        assert child.wait(timeout=10) == -signal.SIGKILL
        assert time.monotonic() - closed_at < 5
        assert child.stderr is not None and "the supervisor is gone" in child.stderr.read()
        deadline = time.monotonic() + 5
        while _running(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(grandchild)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def test_child_outlives_the_thread_that_spawned_it(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG follows the forking thread: a child spawned for a runner thread that has ended must
    keep running (the fork happens on the supervisor's long-lived spawner thread) until it is reaped."""
    from workers.supervise import Children

    children = Children()
    spawned: list[subprocess.Popen[str]] = []

    def spawn() -> None:
        child = children.spawn(
            [sys.executable, "-c", BOUND_CHILD],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
            log_path=tmp_path / "child.log",
        )
        spawned.append(child)
        # The thread ends only once the child has armed PR_SET_PDEATHSIG (it ignores an earlier death).
        assert child.stdout is not None and child.stdout.readline() == "bound\n"

    runner_thread = threading.Thread(target=spawn)
    runner_thread.start()
    runner_thread.join()
    child = spawned[0]
    try:
        time.sleep(1.0)
        assert child.poll() is None, (tmp_path / "child.log").read_text()
    finally:
        children.reap(child)
    assert child.returncode == -signal.SIGKILL


def test_child_of_a_supervisor_already_dead_does_not_start(tmp_path: Path) -> None:
    """The fork-then-parent-died race: the supervisor named in the environment is gone before the child got to
    arm PR_SET_PDEATHSIG, so no signal will come; the real entry point refuses to train."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    spec = tmp_path / "spec.json"  # never read: the check comes before the spec
    child = subprocess.run(
        [sys.executable, "-m", "workers.training", str(spec)],
        env={**os.environ, "PYTHONPATH": str(ROOT), SUPERVISOR_PID_ENV: str(dead.pid)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == EXIT_SUPERVISOR_LOST, child.stderr
    assert f"the supervisor (pid {dead.pid}) died before this training process started" in child.stderr
    assert child.stdout == ""
