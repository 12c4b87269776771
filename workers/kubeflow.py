"""A multi-node job as a Kubeflow Trainer ``TrainJob`` (trainer.kubeflow.org/v1alpha1): the manifest, rendered.

The Helm chart ships the manifest's template (``helm/alignd/templates/kubeflow-trainjob-configmap.yaml``, a
ConfigMap the worker pods mount; ``ALIGND_KUBEFLOW_TEMPLATE`` names the file). Helm fills in what the release
decides (the runtime, the shared data volume, placement, resources); this module fills in what each job
decides, written in the template as ``${alignd.<name>}`` placeholders (Helm leaves ``${...}`` alone):

================== =================================================================================
``job_id``         the alignd job id (``job_...``)
``name``           the TrainJob's name: ``alignd-`` + the job id, an RFC 1035 label (the CRD's CEL rule)
``image``          the training image
``nodes``          ``trainer.numNodes``
``processes``      processes per node (``trainer.numProcPerNode``)
``gpus``           GPUs per node (the GPU resource's request and limit in ``resourcesPerNode``)
``command``        ``python -m torch.distributed.run --nnodes N --nproc_per_node P -m workers.training <spec>``
``spec``           the child's spec file (on the volume every node mounts)
================== =================================================================================

A string that is exactly one placeholder takes the value's own type (``nodes`` an int, ``command`` a list);
placeholders inside a longer string are replaced by their text. The template is parsed as YAML *before*
anything is substituted, so a value can never change the manifest's structure.

Only rendering is done here: nothing submits the manifest to a cluster, relays the remote ranks' progress or
collects their outputs (docs/deploy.md, "Multi-node jobs as Kubeflow TrainJobs", says what was run).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PLACEHOLDER = re.compile(r"\$\{alignd\.([a-z_]+)\}")
NAME_PREFIX = "alignd-"
MAX_NAME = 63  # the CRD's rule on metadata.name (an RFC 1035 label)
CHILD_MODULE = "workers.training"


class TemplateError(ValueError):
    """The template or the inputs cannot make a manifest (the message says which placeholder or value)."""


@dataclass(frozen=True)
class TrainJobInputs:
    job_id: str
    image: str
    nodes: int
    processes_per_node: int
    gpus_per_node: int
    spec_path: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"job_[a-z0-9]+", self.job_id):
            raise TemplateError(f"job id {self.job_id!r} is not an alignd job id (job_ and lowercase hex)")
        for field, value, least in (
            ("nodes", self.nodes, 1),
            ("processes_per_node", self.processes_per_node, 1),
            ("gpus_per_node", self.gpus_per_node, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise TemplateError(f"{field} must be an integer >= {least}, not {value!r}")
        if not self.image or not self.spec_path.startswith("/"):
            raise TemplateError("image must be set and spec_path absolute (a path every node mounts)")


def trainjob_name(job_id: str) -> str:
    """``alignd-job-<hex>``: lowercase letters, digits and '-', starting with a letter, at most 63 characters."""
    name = NAME_PREFIX + job_id.replace("_", "-")
    if len(name) > MAX_NAME:
        raise TemplateError(f"TrainJob name {name!r} is longer than {MAX_NAME} characters")
    return name


def torchrun_command(inputs: TrainJobInputs) -> list[str]:
    """The child the runner starts today (``python -m workers.training spec.json``), under torchrun.

    Each node's rank and the rendezvous address come from the runtime's torch plugin (``PET_NODE_RANK``,
    ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``: torchrun reads every option from its ``PET_`` variable)."""
    return [
        "python", "-m", "torch.distributed.run",
        "--nnodes", str(inputs.nodes),
        "--nproc_per_node", str(inputs.processes_per_node),
        "-m", CHILD_MODULE, inputs.spec_path,
    ]  # fmt: skip


def _values(inputs: TrainJobInputs) -> dict[str, Any]:
    return {
        "job_id": inputs.job_id,
        "name": trainjob_name(inputs.job_id),
        "image": inputs.image,
        "nodes": inputs.nodes,
        "processes": inputs.processes_per_node,
        "gpus": inputs.gpus_per_node,
        "command": torchrun_command(inputs),
        "spec": inputs.spec_path,
    }


def _substitute(node: Any, values: dict[str, Any], where: str) -> Any:
    if isinstance(node, dict):
        return {
            _substitute(key, values, where): _substitute(value, values, f"{where}.{key}")
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_substitute(item, values, f"{where}[{index}]") for index, item in enumerate(node)]
    if not isinstance(node, str):
        return node
    for name in PLACEHOLDER.findall(node):
        if name not in values:
            raise TemplateError(
                f"{where}: unknown placeholder ${{alignd.{name}}} (known: {', '.join(values)})"
            )
    whole = PLACEHOLDER.fullmatch(node)
    if whole is not None:
        return values[whole.group(1)]
    return PLACEHOLDER.sub(lambda match: _as_text(values[match.group(1)], where), node)


def _as_text(value: Any, where: str) -> str:
    if isinstance(value, list):
        raise TemplateError(f"{where}: a list placeholder must be the whole value")
    return str(value)


def render(template: str, inputs: TrainJobInputs) -> dict[str, Any]:
    """The TrainJob manifest for this job from the chart's template (YAML text)."""
    try:
        parsed = yaml.safe_load(template)
    except yaml.YAMLError as exc:
        raise TemplateError(f"the template is not YAML: {exc}") from None
    if not isinstance(parsed, dict) or parsed.get("kind") != "TrainJob":
        raise TemplateError("the template must be one TrainJob object")
    manifest: dict[str, Any] = _substitute(parsed, _values(inputs), "")
    return manifest


def render_file(path: Path, inputs: TrainJobInputs) -> dict[str, Any]:
    try:
        template = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TemplateError(f"cannot read the TrainJob template {path}: {exc}") from None
    return render(template, inputs)
