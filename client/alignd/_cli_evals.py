"""``alignd evals ...``: evaluate jobs from the command line (create, show). Registered by
:func:`alignd.cli.build_parser`; same output and exit-code conventions (``--json`` for the raw object)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from alignd._client import Client

SAMPLING_OPTIONS = ("max_new_tokens", "temperature", "top_p", "num_samples", "max_prompts")


def _cli() -> Any:
    from alignd import cli  # cli.py imports this module: imported lazily, the graph stays one-way

    return cli


def _candidates(values: list[str]) -> list[dict[str, str]]:
    """``base`` (the base model itself) or ``NAME=ART_ID`` (the base with that adapter)."""
    out = []
    for value in values:
        name, sep, adapter = value.partition("=")
        if not name or (sep and not adapter):
            raise _cli().UsageError(f"--candidate takes NAME or NAME=ADAPTER_ID, got {value!r}")
        out.append({"name": name, **({"adapter": adapter} if sep else {})})
    return out


def _graders(values: list[str]) -> list[dict[str, Any]]:
    """Each ``--grader`` is a JSON object or list of objects, inline or ``@file``."""
    graders: list[dict[str, Any]] = []
    for value in values:
        raw = Path(value[1:]).read_text(encoding="utf-8") if value.startswith("@") else value
        try:
            parsed = json.loads(raw)
        except ValueError as exc:
            raise _cli().UsageError(f"--grader is not valid JSON: {exc}") from exc
        items = parsed if isinstance(parsed, list) else [parsed]
        if not all(isinstance(item, dict) for item in items):
            raise _cli().UsageError("--grader must be a JSON object (or a list of objects)")
        graders.extend(items)
    return graders


def _show(client: Client, job_id: str, args: argparse.Namespace, out: TextIO) -> int:
    evaluation = client.evals.retrieve(job_id)
    if args.json:
        _cli()._print_json(evaluation, out)
    else:
        out.write(evaluation.table())
    return 0


def cmd_create(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    sampling = {key: getattr(args, key) for key in SAMPLING_OPTIONS if getattr(args, key) is not None}
    job = client.evals.create(
        base_model=args.base_model,
        prompts=args.prompts,
        candidates=_candidates(args.candidate),
        graders=_graders(args.grader),
        baseline=args.baseline,
        sampling=sampling or None,
        seed=args.seed,
        name=args.name,
    )
    if not args.wait:
        _cli()._show_one(job, args, out)
        return 0
    if not args.json:
        sys.stderr.write(f"submitted {job.id}\n")
    client.jobs.wait(
        job.id, timeout=args.timeout, poll_interval=args.poll_interval, progress=not args.no_progress
    )
    return _show(client, job.id, args, out)


def cmd_show(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    return _show(client, args.id, args, out)


def add_evals_commands(groups: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    evals = groups.add_parser("evals", help="evaluations (evaluate jobs)").add_subparsers(
        dest="command", required=True
    )
    p = leaf(evals, "create", cmd_create, "submit an evaluate job: candidates graded on a prompts dataset")
    p.add_argument("--base-model", required=True, metavar="MODEL_ID")
    p.add_argument("--prompts", required=True, metavar="DATASET_ID", help="prompts dataset")
    p.add_argument(
        "--candidate",
        action="append",
        required=True,
        metavar="NAME[=ADAPTER_ID]",
        help="a candidate (repeatable): NAME alone is the base model",
    )
    p.add_argument("--baseline", metavar="NAME", help="compared against (default: the first candidate)")
    p.add_argument("--grader", action="append", required=True, metavar="JSON|@FILE", help="grader spec(s)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 (the default): greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--num-samples", type=int, help="answers per prompt (needs temperature > 0)")
    p.add_argument("--max-prompts", type=int, help="only the dataset's first N prompts")
    p.add_argument("--seed", type=int)
    p.add_argument("--name")
    p.add_argument("--wait", action="store_true", help="wait for the job, then print its evaluation")
    _cli()._add_wait_options(p)
    leaf(evals, "show", cmd_show, "print an evaluate job's result as a table").add_argument(
        "id", metavar="JOB_ID"
    )
