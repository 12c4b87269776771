"""``alignd-server trainjob JOB_ID``: print a job's Kubeflow TrainJob manifest, rendered from the chart's template.

Run where a worker is configured for it (``ALIGND_KUBEFLOW_TEMPLATE``, ``ALIGND_KUBEFLOW_IMAGE``: the chart sets
both in the worker pods when ``kubeflow.enabled``). It renders and prints; it submits nothing (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from service.settings import Settings


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "trainjob",
        help="Print the Kubeflow TrainJob manifest that runs a job on several nodes through torchrun "
        "(rendered from ALIGND_KUBEFLOW_TEMPLATE; nothing is submitted).",
    )
    parser.add_argument("job_id", help="The alignd job (job_...).")
    parser.add_argument("--nodes", type=int, required=True, help="Training nodes (trainer.numNodes).")
    parser.add_argument("--processes-per-node", type=int, required=True, help="torchrun --nproc_per_node.")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs each node requests (default 0).")
    parser.add_argument(
        "--spec",
        required=True,
        help="The child's spec.json as every node sees it (on the data volume the worker and the nodes share).",
    )
    parser.add_argument("--image", help="Training image (default ALIGND_KUBEFLOW_IMAGE).")
    parser.add_argument("--template", type=Path, help="Template file (default ALIGND_KUBEFLOW_TEMPLATE).")
    parser.add_argument("--output", choices=("yaml", "json"), default="yaml")
    parser.set_defaults(func=trainjob_command)


def trainjob_command(args: argparse.Namespace) -> int:
    from workers.kubeflow import TemplateError, TrainJobInputs, render_file

    settings = Settings()
    template = args.template or settings.kubeflow_template
    image = args.image or settings.kubeflow_image
    if template is None or image is None:
        print("alignd-server trainjob needs ALIGND_KUBEFLOW_TEMPLATE and ALIGND_KUBEFLOW_IMAGE (or --template "
              "and --image)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        inputs = TrainJobInputs(
            job_id=args.job_id,
            image=image,
            nodes=args.nodes,
            processes_per_node=args.processes_per_node,
            gpus_per_node=args.gpus_per_node,
            spec_path=args.spec,
        )
        manifest = render_file(template, inputs)
    except TemplateError as exc:
        print(f"alignd-server trainjob: {exc}", file=sys.stderr)
        return 2
    if args.output == "json":
        print(json.dumps(manifest, indent=2))
    else:
        print(yaml.safe_dump(manifest, sort_keys=False), end="")
    return 0
