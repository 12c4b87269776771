"""The ``alignd`` command line: a thin layer over :class:`alignd.Client` (argparse, no extra dependency).

Exit codes: 0 ok, 1 other error, 2 usage, 3 validation (bad dataset lines, 422), 4 API error (other
4xx/5xx), 5 connection or timeout, 6 job failed or cancelled (``--wait``/``jobs wait``), 130 interrupted.
Human tables by default; ``--json`` prints machine-readable JSON on stdout. Diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel

from alignd._client import Client
from alignd._errors import (
    AlignError,
    APIConnectionError,
    APIStatusError,
    JobFailedError,
    JobWaitTimeoutError,
    ValidationError,
)
from alignd._version import __version__
from alignd.validation import UnknownKindError, ValidationReport, validate_path

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_VALIDATION = 3
EXIT_API = 4
EXIT_CONNECTION = 5
EXIT_JOB_FAILED = 6
EXIT_INTERRUPTED = 130

DATASET_KINDS = ("sft", "preference", "prompts")  # also the job's dataset roles (--sft, ...)
UPLOAD_KINDS = (*DATASET_KINDS, "ranking", "candidates")
METHODS = ("sft", "reward_model", "dpo", "ppo", "grpo", "rloo", "rlhf", "generate", "evaluate")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


class UsageError(Exception):
    pass


# -- output -------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, ValidationReport):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _print_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(_jsonable(value), indent=2, ensure_ascii=False) + "\n")


def _fmt_time(value: Any) -> str:
    if value is None:
        return "-"
    try:
        return _dt.datetime.fromtimestamp(float(value)).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return str(value)


def _fmt_size(value: Any) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(value)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _table(rows: Sequence[Sequence[str]], headers: Sequence[str], out: TextIO) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    out.write("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip() + "\n")
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


Column = tuple[str, Callable[[Any], str]]

MODEL_COLUMNS: list[Column] = [
    ("id", lambda m: m.id),
    ("name", lambda m: _fmt(m.name)),
    ("architecture", lambda m: _fmt(m.architecture)),
    ("params", lambda m: f"{m.num_parameters:,}" if m.num_parameters is not None else "-"),
    ("size", lambda m: _fmt_size(m.size_bytes)),
    ("status", lambda m: _fmt(m.status)),
    ("created", lambda m: _fmt_time(m.created_at)),
]
DATASET_COLUMNS: list[Column] = [
    ("id", lambda d: d.id),
    ("name", lambda d: _fmt(d.name)),
    ("kind", lambda d: _fmt(d.kind)),
    ("records", lambda d: _fmt(d.num_records)),
    ("size", lambda d: _fmt_size(d.size_bytes)),
    ("status", lambda d: _fmt(d.status)),
    ("created", lambda d: _fmt_time(d.created_at)),
]
JOB_COLUMNS: list[Column] = [
    ("id", lambda j: j.id),
    ("name", lambda j: _fmt(j.name)),
    ("method", lambda j: _fmt(j.method)),
    ("status", lambda j: _fmt(j.status)),
    ("stage", lambda j: _fmt(j.stage)),
    ("progress", lambda j: f"{(j.progress or 0) * 100:.0f}%"),
    ("created", lambda j: _fmt_time(j.created_at)),
]
ARTIFACT_COLUMNS: list[Column] = [
    ("id", lambda a: a.id),
    ("job", lambda a: _fmt(a.job)),
    ("stage", lambda a: _fmt(a.stage)),
    ("kind", lambda a: _fmt(a.kind)),
    ("size", lambda a: _fmt_size(a.size_bytes)),
    ("sha256", lambda a: (a.sha256 or "-")[:16]),
    ("created", lambda a: _fmt_time(a.created_at)),
]


def _show_list(items: Iterable[Any], columns: list[Column], args: argparse.Namespace, out: TextIO) -> None:
    items = list(items)
    if args.json:
        _print_json(items, out)
        return
    _table([[fn(item) for _, fn in columns] for item in items], [name for name, _ in columns], out)


def _show_one(item: BaseModel, args: argparse.Namespace, out: TextIO) -> None:
    if args.json:
        _print_json(item, out)
        return
    data = item.model_dump()
    width = max(len(k) for k in data)
    for key, value in data.items():
        shown = _fmt_time(value) if key.endswith("_at") else _fmt(value)
        out.write(f"{key.ljust(width)}  {shown}\n")


def _limited(iterable: Iterable[Any], limit: int | None) -> list[Any]:
    out: list[Any] = []
    for item in iterable:
        if limit is not None and len(out) >= limit:
            break
        out.append(item)
    return out


def _issue_lines(path: str, issues: Iterable[Any]) -> list[str]:
    lines = []
    for issue in issues:
        get = issue.get if isinstance(issue, dict) else (lambda k, i=issue: getattr(i, k, None))
        lines.append(f"{path}:{get('line')}: {get('code')}: {get('message')}")
    return lines


# -- commands -----------------------------------------------------------------------------------------


def _page_size(args: argparse.Namespace) -> int | None:
    return None if args.all or args.limit is None else min(100, max(1, args.limit))


def cmd_models_upload(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    _show_one(client.models.upload(args.folder, name=args.name), args, out)
    return EXIT_OK


def cmd_models_list(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    page = client.models.list(limit=_page_size(args))
    _show_list(_limited(page, None if args.all else args.limit), MODEL_COLUMNS, args, out)
    return EXIT_OK


def cmd_models_get(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    _show_one(client.models.get(args.id), args, out)
    return EXIT_OK


def _show_deleted(args: argparse.Namespace, out: TextIO) -> None:
    if args.json:
        _print_json({"id": args.id, "deleted": True}, out)
    else:
        out.write(f"deleted {args.id}\n")


def cmd_models_delete(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    client.models.delete(args.id)
    _show_deleted(args, out)
    return EXIT_OK


def _report_validation(path: str, report: ValidationReport, args: argparse.Namespace, out: TextIO) -> int:
    if args.json:
        _print_json({"path": path, **report.to_dict()}, out)
    if report.ok:
        if not args.json:
            out.write(
                f"{path}: ok: {report.num_records} {report.kind} records, {_fmt_size(report.size_bytes)}\n"
            )
        return EXIT_OK
    for line in _issue_lines(path, report.issues):
        sys.stderr.write(line + "\n")
    more = report.num_issues - len(report.issues)
    suffix = f" ({more} more not shown)" if more > 0 else ""
    sys.stderr.write(f"{path}: {report.num_issues} bad line(s){suffix}\n")
    return EXIT_VALIDATION


def _validate_locally(path: str, kind: str) -> ValidationReport:
    """The SDK's own copy of the server's dataset rules; a bad kind or an unreadable file is a usage error."""
    try:
        return validate_path(path, kind)
    except UnknownKindError as exc:
        raise UsageError(str(exc)) from exc
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc


def cmd_datasets_validate(client: Client | None, args: argparse.Namespace, out: TextIO) -> int:
    return _report_validation(args.path, _validate_locally(args.path, args.kind), args, out)


def cmd_datasets_upload(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    if not args.no_validate:
        report = _validate_locally(args.path, args.kind)
        if not report.ok:
            return _report_validation(args.path, report, args, out)
    try:
        dataset = client.datasets.upload(args.path, kind=args.kind, name=args.name)
    except ValidationError as exc:
        if exc.details:
            for line in _issue_lines(args.path, exc.details):
                sys.stderr.write(line + "\n")
        raise
    _show_one(dataset, args, out)
    return EXIT_OK


def cmd_datasets_list(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    page = client.datasets.list(limit=_page_size(args))
    _show_list(_limited(page, None if args.all else args.limit), DATASET_COLUMNS, args, out)
    return EXIT_OK


def cmd_datasets_get(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    _show_one(client.datasets.get(args.id), args, out)
    return EXIT_OK


def cmd_datasets_delete(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    client.datasets.delete(args.id)
    _show_deleted(args, out)
    return EXIT_OK


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _load_json_arg(text: str, what: str) -> dict[str, Any]:
    raw = Path(text[1:]).read_text(encoding="utf-8") if text.startswith("@") else text
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object")
    return value


def _hyperparameters(args: argparse.Namespace) -> dict[str, Any] | None:
    result: dict[str, Any] = (
        _load_json_arg(args.hyperparameters, "--hyperparameters") if args.hyperparameters else {}
    )
    for item in args.hp or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--hp takes key=value (e.g. epochs=1 or sft.max_steps=10), got {item!r}")
        target = result
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise UsageError(f"--hp {key}: {part} is not a mapping")
        target[leaf] = _parse_value(value)
    return result or None


def _lora(args: argparse.Namespace) -> dict[str, Any] | None:
    lora: dict[str, Any] = _load_json_arg(args.lora, "--lora") if args.lora else {}
    for field, value in (("r", args.lora_r), ("alpha", args.lora_alpha), ("dropout", args.lora_dropout)):
        if value is not None:
            lora[field] = value
    if args.target_modules:
        modules = [m.strip() for m in args.target_modules.split(",") if m.strip()]
        lora["target_modules"] = modules[0] if modules == ["all-linear"] else modules
    return lora or None


def _resources(args: argparse.Namespace) -> dict[str, Any] | None:
    resources: dict[str, Any] = {}
    if args.processes is not None:
        resources["processes"] = args.processes
    if args.strategy is not None:
        resources["strategy"] = args.strategy
    if args.precision is not None:
        resources["precision"] = args.precision
    return resources or None


def _wait(client: Client, job_id: str, args: argparse.Namespace, out: TextIO) -> int:
    job = client.jobs.wait(
        job_id,
        timeout=args.timeout,
        poll_interval=args.poll_interval,
        progress=not args.no_progress,
    )
    _show_one(job, args, out)
    return EXIT_OK


def cmd_jobs_create(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    datasets = {role: getattr(args, role) for role in DATASET_KINDS if getattr(args, role)}
    job = client.jobs.create(
        method=args.method,
        base_model=args.base_model,
        datasets=datasets,
        init_adapter=args.init_adapter,
        reward_model=args.reward_model,
        init_reward_model=args.init_reward_model,
        round=args.round,
        lora=_lora(args),
        resources=_resources(args),
        hyperparameters=_hyperparameters(args),
        seed=args.seed,
        name=args.name,
    )
    if args.wait:
        if not args.json:
            sys.stderr.write(f"submitted {job.id}\n")
        return _wait(client, job.id, args, out)
    _show_one(job, args, out)
    return EXIT_OK


def cmd_jobs_list(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    page = client.jobs.list(status=args.status, limit=_page_size(args))
    _show_list(_limited(page, None if args.all else args.limit), JOB_COLUMNS, args, out)
    return EXIT_OK


def cmd_jobs_get(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    _show_one(client.jobs.get(args.id), args, out)
    return EXIT_OK


def cmd_jobs_cancel(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    _show_one(client.jobs.cancel(args.id), args, out)
    return EXIT_OK


def cmd_jobs_pause(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    _show_one(client.jobs.pause(args.id), args, out)
    return EXIT_OK


def cmd_jobs_resume(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    _show_one(client.jobs.resume(args.id), args, out)
    return EXIT_OK


def cmd_jobs_wait(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    return _wait(client, args.id, args, out)


def cmd_jobs_events(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    events = client.jobs.stream_events(args.id) if args.follow else client.jobs.events(args.id)
    for event in events:
        if args.json:
            out.write(json.dumps(event.model_dump(mode="json"), ensure_ascii=False) + "\n")
        else:
            stage = f" [{event.stage}]" if event.stage else ""
            out.write(
                f"{_fmt_time(event.created_at)} {(event.level or 'info').upper():7}{stage} {event.message}\n"
            )
        out.flush()
    return EXIT_OK


def cmd_jobs_metrics(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    if args.csv:
        out.write(client.jobs.metrics_csv(args.id))
        return EXIT_OK
    metrics = client.jobs.metrics(args.id)
    if args.name:
        metrics = type(metrics)(m for m in metrics if m.name in args.name)
    if args.json:
        _print_json(metrics.as_dict(stage=args.stage), out)
        return EXIT_OK
    rows = [
        [_fmt(m.stage), _fmt(m.step), m.name, _fmt(m.value)]
        for m in metrics
        if args.stage is None or m.stage == args.stage
    ]
    _table(rows, ["stage", "step", "name", "value"], out)
    return EXIT_OK


def cmd_artifacts_list(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    _show_list(client.jobs.artifacts(args.job), ARTIFACT_COLUMNS, args, out)
    return EXIT_OK


def cmd_artifacts_get(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    _show_one(client.artifacts.get(args.id), args, out)
    return EXIT_OK


def cmd_artifacts_download(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    folder = client.artifacts.download(args.id, args.dest)
    if args.json:
        _print_json({"id": args.id, "path": str(folder)}, out)
    else:
        out.write(f"{folder}\n")
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    """Options accepted both before and after the subcommand (``alignd --json models list`` or at the end)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    common.add_argument(
        "--base-url", default=argparse.SUPPRESS, help="server URL (env ALIGND_BASE_URL, else 127.0.0.1:8000)"
    )
    common.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (env ALIGND_API_KEY)")
    common.add_argument(
        "--request-timeout", type=float, default=argparse.SUPPRESS, help="seconds per network operation"
    )
    common.add_argument("--max-retries", type=int, default=argparse.SUPPRESS, help="retries (default 2)")
    return common


def _add_list_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=20, help="show at most this many (default 20)")
    p.add_argument("--all", action="store_true", help="show every item, across all pages")


def _add_wait_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="give up waiting after")
    p.add_argument("--poll-interval", type=float, default=2.0, metavar="SECONDS")
    p.add_argument("--no-progress", action="store_true", help="no live progress line on stderr")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="alignd",
        parents=[common],
        description="alignd: upload models and datasets, run alignment jobs, download adapters.",
        epilog="Exit codes: 0 ok, 1 error, 2 usage, 3 validation, 4 API error, 5 connection, 6 job failed.",
    )
    parser.add_argument("--version", action="version", version=f"alignd {__version__}")
    groups = parser.add_subparsers(
        dest="group", metavar="{models,datasets,jobs,artifacts,feedback,evals}", required=True
    )

    def leaf(sub: Any, name: str, handler: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, parents=[common], help=help_text, description=help_text
        )
        p.set_defaults(handler=handler)
        return p

    models = groups.add_parser("models", help="base models").add_subparsers(dest="command", required=True)
    p = leaf(models, "upload", cmd_models_upload, "upload a Hugging Face model folder (safetensors)")
    p.add_argument("folder")
    p.add_argument("--name")
    _add_list_options(leaf(models, "list", cmd_models_list, "list models"))
    leaf(models, "get", cmd_models_get, "show a model").add_argument("id")
    leaf(models, "delete", cmd_models_delete, "delete a model").add_argument("id")

    datasets = groups.add_parser("datasets", help="JSONL datasets").add_subparsers(
        dest="command", required=True
    )
    p = leaf(datasets, "upload", cmd_datasets_upload, "validate locally, then upload a JSONL dataset")
    p.add_argument("path")
    p.add_argument("--kind", required=True, choices=UPLOAD_KINDS)
    p.add_argument("--name")
    p.add_argument(
        "--no-validate", action="store_true", help="skip the local check (the server checks anyway)"
    )
    p = leaf(datasets, "validate", cmd_datasets_validate, "check a JSONL dataset locally, no server needed")
    p.add_argument("path")
    p.add_argument("--kind", required=True, choices=UPLOAD_KINDS)
    _add_list_options(leaf(datasets, "list", cmd_datasets_list, "list datasets"))
    leaf(datasets, "get", cmd_datasets_get, "show a dataset").add_argument("id")
    leaf(datasets, "delete", cmd_datasets_delete, "delete a dataset").add_argument("id")

    jobs = groups.add_parser("jobs", help="training jobs").add_subparsers(dest="command", required=True)
    p = leaf(jobs, "create", cmd_jobs_create, "submit a job")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--base-model", required=True, metavar="MODEL_ID")
    p.add_argument("--sft", metavar="DATASET_ID", help="sft dataset")
    p.add_argument("--preference", metavar="DATASET_ID", help="preference dataset")
    p.add_argument("--prompts", metavar="DATASET_ID", help="prompts dataset")
    p.add_argument("--init-adapter", metavar="ARTIFACT_ID")
    p.add_argument("--reward-model", metavar="ARTIFACT_ID")
    p.add_argument("--init-reward-model", metavar="ARTIFACT_ID", help="reward model to continue training")
    p.add_argument("--round", type=int, help="feedback round of this job")
    p.add_argument("--hp", action="append", metavar="KEY=VALUE", help="a hyperparameter (repeatable)")
    p.add_argument("--hyperparameters", metavar="JSON|@FILE", help="all hyperparameters as JSON")
    p.add_argument("--lora", metavar="JSON|@FILE", help="LoRA settings as JSON")
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--target-modules", metavar="A,B,...")
    p.add_argument("--processes", type=int, help="training processes on one worker (resources.processes)")
    p.add_argument(
        "--strategy",
        choices=["ddp", "fsdp"],
        help="resources.strategy: ddp (every process holds the base) or fsdp (its layers sharded)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help="the base's dtype (resources.precision; bf16 is fast on CPUs with Intel AMX)",
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--name")
    p.add_argument("--wait", action="store_true", help="wait for the job, with live progress")
    _add_wait_options(p)
    p = leaf(jobs, "list", cmd_jobs_list, "list jobs")
    p.add_argument("--status", choices=JOB_STATUSES)
    _add_list_options(p)
    leaf(jobs, "get", cmd_jobs_get, "show a job").add_argument("id")
    leaf(jobs, "cancel", cmd_jobs_cancel, "cancel a job").add_argument("id")
    leaf(jobs, "pause", cmd_jobs_pause, "pause a job (at its next step, after a checkpoint)").add_argument(
        "id"
    )
    leaf(jobs, "resume", cmd_jobs_resume, "resume a paused job from its newest checkpoint").add_argument("id")
    p = leaf(jobs, "wait", cmd_jobs_wait, "wait for a job to finish, with live progress")
    p.add_argument("id")
    _add_wait_options(p)
    p = leaf(jobs, "events", cmd_jobs_events, "print a job's events")
    p.add_argument("id")
    p.add_argument("-f", "--follow", action="store_true", help="stream live until the job ends")
    p = leaf(jobs, "metrics", cmd_jobs_metrics, "print a job's metrics")
    p.add_argument("id")
    p.add_argument("--stage")
    p.add_argument("--name", action="append", help="only this metric (repeatable)")
    p.add_argument("--csv", action="store_true", help="the server's CSV")

    artifacts = groups.add_parser("artifacts", help="job outputs").add_subparsers(
        dest="command", required=True
    )
    p = leaf(artifacts, "download", cmd_artifacts_download, "download, verify and extract an artifact")
    p.add_argument("id")
    p.add_argument("dest", nargs="?", help="folder to extract into (default ./<id>)")
    leaf(artifacts, "list", cmd_artifacts_list, "list a job's artifacts").add_argument(
        "job", metavar="JOB_ID"
    )
    leaf(artifacts, "get", cmd_artifacts_get, "show an artifact").add_argument("id")

    from alignd._cli_evals import add_evals_commands
    from alignd._cli_feedback import add_feedback_commands

    add_feedback_commands(groups, leaf)
    add_evals_commands(groups, leaf)
    return parser


def _error_exit(exc: BaseException) -> int:
    if isinstance(exc, JobFailedError):
        return EXIT_JOB_FAILED
    if isinstance(exc, ValidationError):
        return EXIT_VALIDATION
    if isinstance(exc, APIConnectionError):
        return EXIT_CONNECTION
    if isinstance(exc, APIStatusError):
        return EXIT_API
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None) -> int:
    out = stdout if stdout is not None else sys.stdout
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version exit 0, bad usage exits 2
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    for name, default in (("json", False), ("base_url", None), ("api_key", None), ("request_timeout", None)):
        if not hasattr(args, name):
            setattr(args, name, default)
    max_retries = getattr(args, "max_retries", None)
    handler: Callable[..., int] = args.handler
    try:
        if handler is cmd_datasets_validate:
            return handler(None, args, out)
        kwargs: dict[str, Any] = {
            "base_url": args.base_url,
            "api_key": args.api_key,
            "timeout": args.request_timeout,
        }
        if max_retries is not None:
            kwargs["max_retries"] = max_retries
        with Client(**kwargs) as client:
            return handler(client, args, out)
    except UsageError as exc:
        sys.stderr.write(f"alignd: error: {exc}\n")
        return EXIT_USAGE
    except JobWaitTimeoutError as exc:
        sys.stderr.write(f"alignd: {exc.message}\n")
        return EXIT_ERROR
    except AlignError as exc:
        sys.stderr.write(f"alignd: error: {exc}\n")
        if isinstance(exc, JobFailedError) and args.json:
            _print_json(exc.job, out)
        return _error_exit(exc)
    except FileNotFoundError as exc:
        sys.stderr.write(f"alignd: error: {exc}\n")
        return EXIT_USAGE
    except NotADirectoryError as exc:
        sys.stderr.write(f"alignd: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("\nalignd: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `alignd jobs events -f | head`: the reader left; exit quietly.
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
