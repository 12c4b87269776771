"""Multi-GPU worker pods and multi-node jobs as Kubeflow Trainer TrainJobs: rendered, then validated.

The chart (``kubeflow.enabled``) ships the TrainJob template as a ConfigMap the worker pods mount;
``workers/kubeflow.py`` (``alignd-server trainjob``) fills in a job's fields. The manifest is validated against
the Trainer operator's published CRD (``tests/deploy/crds``, vendored: no network here) with ``jsonschema``,
strictly (an unknown field fails, as the API server's strict field validation would), and the CEL rules on
the fields it sets are checked by hand. Nothing here talks to a cluster: there is none.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.deploy_support import CHART, MULTI_NODE_VALUES, REPO, Rendered, run_helm
from workers.kubeflow import TemplateError, TrainJobInputs, render, torchrun_command

CRD = Path(__file__).parent / "crds" / "trainer.kubeflow.org_trainjobs.yaml"
JOB = "job_0123456789abcdef01234567"
SPEC = f"/var/lib/alignd/work/jobs/{JOB}/attempt-1/spec.json"
# The CEL rules a create is checked against on the fields alignd sets, each evaluated here by hand; every other
# rule met on the way must be an update-only one ("self == oldSelf").
NAME_RULES = {
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
    "size(self.metadata.name) <= 63",
}
NUM_PROC_RULE = "self >= 1"
UPDATE_ONLY = "self == oldSelf"


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused (kubectl's default strict field validation, not pruning)."""
    if isinstance(schema, dict):
        out = {key: _strict(value) for key, value in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["group"] == "trainer.kubeflow.org" and crd["spec"]["names"]["kind"] == "TrainJob"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _rules(schema: dict[str, Any], instance: Any, path: str = "") -> list[tuple[str, str, Any]]:
    """(path, CEL rule, the value it applies to) for every rule on the way down the instance."""
    found = [(path or ".", rule["rule"], instance) for rule in schema.get("x-kubernetes-validations", [])]
    if isinstance(instance, dict):
        for key, value in instance.items():
            sub = schema.get("properties", {}).get(key) or schema.get("additionalProperties")
            if isinstance(sub, dict):
                found += _rules(sub, value, f"{path}.{key}")
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for index, value in enumerate(instance):
            found += _rules(schema["items"], value, f"{path}[{index}]")
    return found


def problems(schema: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """Everything the CRD's schema and its create-time CEL rules refuse in the manifest (empty: it validates)."""
    validator = jsonschema.Draft7Validator(_strict(schema))
    out = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    for path, rule, value in _rules(schema, manifest):
        if rule == UPDATE_ONLY:
            continue
        if rule in NAME_RULES:
            name = value["metadata"]["name"]
            holds = (
                re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) if "matches" in rule else len(name) <= 63
            )
            if not holds:
                out.append(f"{path}: metadata.name {name!r} breaks {rule}")
        elif rule == NUM_PROC_RULE and path == ".spec.trainer.numProcPerNode":
            if not value >= 1:
                out.append(f"{path}: {value} breaks {rule}")
        else:
            out.append(f"{path}: CEL rule not checked by this test: {rule}")
    return out


def template_of(rendered: Rendered) -> str:
    (configmap,) = [o for o in rendered.of_kind("ConfigMap") if o["metadata"]["name"].endswith("-trainjob")]
    assert configmap["metadata"]["labels"]["app.kubernetes.io/component"] == "trainjob-template"
    text: str = configmap["data"]["trainjob.yaml"]
    return text


@pytest.fixture(scope="module")
def multi_node(helm_template) -> Rendered:
    rendered: Rendered = helm_template(values=[MULTI_NODE_VALUES])
    return rendered


def _inputs(nodes: int = 2, processes: int = 4, gpus: int = 4, **extra: Any) -> TrainJobInputs:
    values = {"job_id": JOB, "image": "registry.example.com/alignd/alignd:0.1.0-cuda", "spec_path": SPEC}
    return TrainJobInputs(
        nodes=nodes, processes_per_node=processes, gpus_per_node=gpus, **{**values, **extra}
    )


def test_workers_request_n_gpus_and_mount_the_trainjob_template(multi_node, default_render):
    worker = multi_node.one("Deployment", "worker")
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 4
    pod = worker["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ALIGND_KUBEFLOW_TEMPLATE"] == "/etc/alignd/kubeflow/trainjob.yaml"
    assert env["ALIGND_KUBEFLOW_IMAGE"] == container["image"] == "ghcr.io/alignd/alignd:0.1.0-cuda"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "kubeflow-template")
    assert mount == {"name": "kubeflow-template", "mountPath": "/etc/alignd/kubeflow", "readOnly": True}
    volume = next(v for v in pod["volumes"] if v["name"] == "kubeflow-template")
    assert volume["configMap"]["name"] == "rel-alignd-trainjob"
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert data == {"name": "data", "persistentVolumeClaim": {"claimName": "alignd-shared-data"}}
    # Off by default: no template, nothing mounted.
    assert not [o for o in default_render.of_kind("ConfigMap") if o["metadata"]["name"].endswith("-trainjob")]
    assert "kubeflow" not in json.dumps(default_render.one("Deployment", "worker"))


@pytest.mark.parametrize(("nodes", "processes", "gpus"), [(2, 4, 4), (8, 8, 8), (3, 2, 0)])
def test_rendered_trainjob_validates_against_the_trainer_crd(multi_node, crd_schema, nodes, processes, gpus):
    manifest = render(template_of(multi_node), _inputs(nodes, processes, gpus))
    assert problems(crd_schema, manifest) == []
    assert manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and manifest["kind"] == "TrainJob"
    assert manifest["metadata"]["name"] == "alignd-job-0123456789abcdef01234567"
    assert manifest["metadata"]["namespace"] == "alignd"
    assert manifest["metadata"]["labels"]["alignd.dev/job"] == JOB
    spec = manifest["spec"]
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    trainer = spec["trainer"]
    assert trainer["numNodes"] == nodes and trainer["numProcPerNode"] == processes
    assert trainer["image"] == "registry.example.com/alignd/alignd:0.1.0-cuda"
    assert trainer["command"] == [
        "python", "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", str(processes),
        "-m", "workers.training", SPEC,
    ]  # fmt: skip
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == gpus
    assert trainer["resourcesPerNode"]["requests"]["nvidia.com/gpu"] == gpus
    assert trainer["resourcesPerNode"]["requests"]["memory"] == "64Gi"
    (patch,) = spec["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = _node_pod(manifest)
    assert node["name"] == "node" and pod["containers"][0]["name"] == "node"  # the runtime's names
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["alignd-shared-data"]
    assert {"name": "data", "mountPath": "/var/lib/alignd"} in pod["containers"][0]["volumeMounts"]
    assert SPEC.startswith("/var/lib/alignd/")  # the spec is on the shared claim every node mounts


def test_the_validation_refuses_what_the_operator_would(multi_node, crd_schema):
    """Each change breaks the manifest in one way the API server would refuse; each is caught."""
    good = render(template_of(multi_node), _inputs())
    breakages = {
        "numNodes": lambda m: m["spec"]["trainer"].__setitem__("numNodes", "two"),
        "gpusPerNode": lambda m: m["spec"]["trainer"].__setitem__("gpusPerNode", 4),  # no such field
        "numProcPerNode": lambda m: m["spec"]["trainer"].__setitem__("numProcPerNode", 0),  # a CEL rule
        "metadata.name": lambda m: m["metadata"].__setitem__("name", "Alignd_Job"),  # a CEL rule
        "metadata.name length": lambda m: m["metadata"].__setitem__("name", "a" * 64),  # another
        "a container field": lambda m: _node_pod(m)["containers"][0].__setitem__("ports", "8080"),
        "runtimeRef": lambda m: m["spec"].pop("runtimeRef"),
        "command": lambda m: m["spec"]["trainer"].__setitem__("command", "python -m x"),
    }
    for what, breaking in breakages.items():
        broken = copy.deepcopy(good)
        breaking(broken)
        assert problems(crd_schema, broken), what


def _node_pod(manifest: dict[str, Any]) -> dict[str, Any]:
    (patch,) = manifest["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod: dict[str, Any] = node["template"]["spec"]["template"]["spec"]
    return pod


def test_kubeflow_values_are_checked(tools):
    base = ["template", "rel", str(CHART), "--set", "kubeflow.enabled=true"]
    proc = run_helm(tools, *base)
    assert proc.returncode != 0 and "kubeflow.dataClaim" in proc.stderr
    for override, message in (
        ("kubeflow.runtimeRef.kind=Pod", "/kubeflow/runtimeRef/kind"),
        ("kubeflow.activeDeadlineSeconds=-1", "/kubeflow/activeDeadlineSeconds"),
        ("kubeflow.nodes=2", "nodes"),
    ):
        proc = run_helm(tools, *base, "--set", "kubeflow.dataClaim=c", "--set", override)
        assert proc.returncode != 0 and message in proc.stdout + proc.stderr, override


def test_alignd_server_trainjob_prints_the_manifest(multi_node, crd_schema, tmp_path):
    """The command a worker pod runs: the mounted template and the worker image from the environment."""
    template = tmp_path / "trainjob.yaml"
    template.write_text(template_of(multi_node))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "ALIGND_KUBEFLOW_TEMPLATE": str(template),
        "ALIGND_KUBEFLOW_IMAGE": "ghcr.io/alignd/alignd:0.1.0-cuda",
    }
    command = [sys.executable, "-m", "alignd_server.cli", "trainjob", JOB, "--spec", SPEC]

    def run(*args: str, environ: dict[str, str] = env) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*command, *args], capture_output=True, text=True, env=environ, timeout=60)

    done = run("--nodes", "2", "--processes-per-node", "8", "--gpus-per-node", "8")
    assert done.returncode == 0, done.stderr
    manifest = yaml.safe_load(done.stdout)
    assert problems(crd_schema, manifest) == []
    assert manifest["spec"]["trainer"]["image"] == "ghcr.io/alignd/alignd:0.1.0-cuda"
    assert manifest["spec"]["trainer"]["command"] == torchrun_command(_inputs(2, 8, 8))
    as_json = run("--nodes", "2", "--processes-per-node", "8", "--gpus-per-node", "8", "--output", "json")
    assert json.loads(as_json.stdout) == manifest

    refused = run("--nodes", "0", "--processes-per-node", "8")
    assert refused.returncode == 2 and "nodes must be an integer >= 1" in refused.stderr
    unconfigured = {k: v for k, v in env.items() if not k.startswith("ALIGND_KUBEFLOW")}
    refused = run("--nodes", "2", "--processes-per-node", "1", environ=unconfigured)
    assert refused.returncode == 2 and "ALIGND_KUBEFLOW_TEMPLATE" in refused.stderr


def test_values_fill_fields_and_never_change_the_structure():
    template = (
        "kind: TrainJob\nmetadata: {name: '${alignd.name}', note: 'image ${alignd.image} on ${alignd.nodes}'}\n"
        "spec: {trainer: {image: '${alignd.image}', numNodes: '${alignd.nodes}'}}\n"
    )
    sneaky = "img:1\n  evil: true"
    manifest = render(template, _inputs(image=sneaky))
    assert manifest["spec"]["trainer"] == {
        "image": sneaky,
        "numNodes": 2,
    }  # a string and an int, nothing more
    assert manifest["metadata"]["note"] == f"image {sneaky} on 2"
    with pytest.raises(TemplateError, match="unknown placeholder"):
        render("kind: TrainJob\nspec: {x: '${alignd.gpu}'}\n", _inputs())
    with pytest.raises(TemplateError, match="whole value"):
        render("kind: TrainJob\nspec: {x: 'run ${alignd.command}'}\n", _inputs())
    with pytest.raises(TemplateError, match="one TrainJob"):
        render("kind: PyTorchJob\n", _inputs())
    for bad in ({"nodes": 0}, {"processes": 0}, {"gpus": -1}):
        with pytest.raises(TemplateError):
            _inputs(**bad)
    with pytest.raises(TemplateError, match="alignd job id"):
        _inputs(job_id="Job_X")
    with pytest.raises(TemplateError, match="absolute"):
        _inputs(spec_path="spec.json")
