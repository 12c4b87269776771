"""The ``alignd`` CLI in-process against a real (scripted) HTTP server: output, --json, exit codes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import alignd.cli as cli
import pytest

from tests.client.scripted import Reply, ScriptedServer, error_reply, job_body, model_body


def run(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(args, stdout=out)
    return code, out.getvalue()


def test_models_list_table_and_json(server: ScriptedServer) -> None:
    listing = {"object": "list", "data": [model_body("model_a"), model_body("model_b")], "has_more": False}
    server.route("GET", "/v1/models", Reply(200, listing))
    code, text = run(["--base-url", server.base_url, "models", "list"])
    assert code == cli.EXIT_OK
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["ID", "NAME", "ARCHITECTURE"]
    assert lines[1].startswith("model_a") and "LlamaForCausalLM" in lines[1]
    code, text = run(["models", "list", "--json", "--base-url", server.base_url])
    assert code == cli.EXIT_OK
    assert [m["id"] for m in json.loads(text)] == ["model_a", "model_b"]


def test_api_key_flag_is_sent(server: ScriptedServer) -> None:
    server.route("GET", "/v1/jobs/job_1", Reply(200, job_body()))
    code, text = run(["jobs", "get", "job_1", "--base-url", server.base_url, "--api-key", "k1"])
    assert code == 0 and "job_1" in text
    assert server.requests[0].headers["authorization"] == "Bearer k1"


def test_not_found_is_an_api_error_exit(server: ScriptedServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run(["--base-url", server.base_url, "models", "get", "model_x"])
    assert code == cli.EXIT_API
    assert "404" in capsys.readouterr().err


def test_validate_prints_file_line_code_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "p"}\n\n{nope\n')
    code, _ = run(["datasets", "validate", str(path), "--kind", "sft"])
    assert code == cli.EXIT_VALIDATION
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{path}:2: missing_field: ")
    assert err[1].startswith(f"{path}:4: invalid_json: ")
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "p", "completion": "c"}\n')
    code, text = run(["datasets", "validate", str(good), "--kind", "sft", "--json"])
    assert code == cli.EXIT_OK and json.loads(text)["num_records"] == 1


def test_upload_rejected_by_server_prints_bad_lines(
    server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n')
    details = [{"line": 1, "code": "identical_pair", "message": "chosen == rejected"}]
    server.route("POST", "/v1/datasets", error_reply(422, "invalid_dataset", "1 bad line", details))
    code, _ = run(["--base-url", server.base_url, "datasets", "upload", str(path), "--kind", "sft"])
    assert code == cli.EXIT_VALIDATION
    assert f"{path}:1: identical_pair: chosen == rejected" in capsys.readouterr().err


def test_jobs_create_with_hyperparameters_and_wait(server: ScriptedServer) -> None:
    server.route("POST", "/v1/jobs", Reply(202, job_body()))
    server.route(
        "GET", "/v1/jobs/job_1", Reply(200, job_body(status="failed", error={"code": "x", "message": "boom"}))
    )
    code, _ = run(
        [
            "--base-url", server.base_url, "jobs", "create", "--method", "sft", "--base-model", "model_1",
            "--sft", "ds_1", "--hp", "max_steps=2", "--hp", "learning_rate=0.001", "--lora-r", "4",
            "--target-modules", "q_proj,v_proj", "--processes", "2", "--strategy", "fsdp", "--precision", "bf16",
            "--wait",
            "--poll-interval", "0.01", "--no-progress",
        ]
    )  # fmt: skip
    assert code == cli.EXIT_JOB_FAILED
    body = json.loads(server.calls("POST", "/v1/jobs")[0].body)
    assert body["hyperparameters"] == {"max_steps": 2, "learning_rate": 0.001}
    assert body["lora"] == {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    assert body["datasets"] == {"sft": "ds_1"}
    assert body["resources"] == {"processes": 2, "strategy": "fsdp", "precision": "bf16"}


def test_usage_and_connection_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["models"])[0] == cli.EXIT_USAGE
    assert run(["jobs", "create", "--method", "sft", "--base-model", "m", "--hp", "bad"])[0] == cli.EXIT_USAGE
    code, _ = run(["--base-url", "http://127.0.0.1:9", "--max-retries", "0", "jobs", "list"])
    assert code == cli.EXIT_CONNECTION


def test_metrics_json_is_the_dict_of_lists(server: ScriptedServer) -> None:
    data = {"object": "list", "data": [{"stage": "sft", "step": 1, "name": "loss", "value": 1.0}]}
    server.route("GET", "/v1/jobs/job_1/metrics", Reply(200, data))
    code, text = run(["--base-url", server.base_url, "jobs", "metrics", "job_1", "--json"])
    assert code == 0 and json.loads(text) == {"loss": {"step": [1], "value": [1.0]}}


def test_console_script_entry_point_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from alignd.cli import main; sys.exit(main(['--version']))"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and "alignd 0.1.0" in proc.stdout
