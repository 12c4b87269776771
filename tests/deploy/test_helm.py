"""The Helm chart, checked with the real helm binary (lint --strict, template) and the parsed manifests."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.deploy_support import (
    CHART,
    FETCH_TOOLS,
    GPU_VALUES,
    MULTI_NODE_VALUES,
    POOLS_VALUES,
    REPO,
    TOOLS_BIN,
    Rendered,
    run_helm,
)

# Sample credentials passed as values: they must never show up in plain text in a rendered manifest.
SAMPLE_SECRETS = {
    "secrets.databaseUrl": "postgresql+psycopg://alignd:pg-Sample-Pass-71c3@db:5432/alignd",
    "secrets.redisUrl": "redis://:redis-Sample-Pass-4e2a@redis:6379/0",
    "secrets.apiKeys": "tenant-a:apikey-Sample-9f1b",
    "secrets.awsAccessKeyId": "AKIASAMPLEKEYID0042",
    "secrets.awsSecretAccessKey": "aws-Sample-Secret-d8e5",
    "secrets.redisPassword": "redis-Sample-Pass-4e2a",
}
SECRET_FRAGMENTS = [
    "pg-Sample-Pass-71c3",
    "redis-Sample-Pass-4e2a",
    "apikey-Sample-9f1b",
    "AKIASAMPLEKEYID0042",
    "aws-Sample-Secret-d8e5",
]
SECRET_SETS = [f"{k}={v}" for k, v in SAMPLE_SECRETS.items()]
EXISTING = "alignd-credentials"


def pod_specs(r: Rendered) -> list[tuple[str, dict]]:
    out = []
    for o in r.objects:
        if o["kind"] in ("Deployment", "Job"):
            out.append((f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]))
    return out


def container(obj: dict) -> dict:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def walk_strings(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from walk_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk_strings(v)
    elif node is not None:
        yield str(node)


# ------------------------------------------------------------------------------------------------ lint / schema


@pytest.mark.parametrize(
    "values",
    [None, GPU_VALUES, POOLS_VALUES, MULTI_NODE_VALUES],
    ids=["default", "gpu-production", "worker-pools", "multi-node"],
)
def test_helm_lint_strict(tools, values):
    args = ["lint", str(CHART), "--strict"] + (["-f", str(values)] if values else [])
    proc = run_helm(tools, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("api.replicas=notanumber", "/api/replicas"),
        ("config.queue=kafka", "/config/queue"),
        ("api.replicaz=3", "replicaz"),
        ("worker.gpu.count=-1", "/worker/gpu/count"),
        ("config.logLevel=loud", "/config/logLevel"),
    ],
)
def test_schema_rejects_bad_values(tools, override, message):
    for cmd in (["template", "rel", str(CHART)], ["lint", str(CHART), "--strict"]):
        proc = run_helm(tools, *cmd, "--set", override)
        assert proc.returncode != 0, f"{cmd[0]} accepted {override}"
        assert message in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["worker.keda.enabled=true"], "worker.keda.redis.address"),
        (
            [
                "worker.keda.enabled=true",
                "worker.keda.redis.address=r:6379",
                "worker.keda.redis.passwordSecretKey=redis-password",
            ],
            "secrets.redisPassword",
        ),
        (["config.queue=inline"], "config.queue=inline"),
        (
            ["api.autoscaling.enabled=true", "api.autoscaling.targetCPUUtilizationPercentage=0"],
            "api.autoscaling",
        ),
        (
            [
                "api.autoscaling.enabled=true",
                "api.autoscaling.minReplicas=5",
                "api.autoscaling.maxReplicas=2",
            ],
            "minReplicas",
        ),
    ],
)
def test_template_fails_on_inconsistent_values(tools, sets, message):
    proc = run_helm(tools, "template", "rel", str(CHART), *[a for s in sets for a in ("--set", s)])
    assert proc.returncode != 0
    assert message in proc.stderr


def test_chart_metadata_and_one_object_per_template(default_render, gpu_render, helm_template):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"]
    assert (CHART / "templates" / "NOTES.txt").is_file()
    for r in (default_render, gpu_render, helm_template(values=[MULTI_NODE_VALUES])):
        sources = re.findall(r"^# Source: (\S+)$", r.text, flags=re.M)
        assert len(sources) == len(r.objects)
        assert len(sources) == len(set(sources)), "a template renders more than one object"


def _schema_props(schema: dict, path: str = ""):
    for name, sub in schema.get("properties", {}).items():
        yield f"{path}{name}", sub
        yield from _schema_props(sub, f"{path}{name}.")
    items = schema.get("items")
    if isinstance(items, dict):
        yield from _schema_props(items, f"{path}[].")


def test_every_value_is_typed_and_documented():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"].startswith("http://json-schema.org/draft-07/")
    assert schema["additionalProperties"] is False
    undocumented = [
        p
        for p, sub in _schema_props(schema)
        if "description" not in sub
        and "[]" not in p
        and not p.endswith(("rollingUpdate", "maxSurge"))
        and not p.endswith("maxUnavailable")
    ]
    assert not undocumented, undocumented

    # values.yaml: every key the chart owns has a comment line right above it. Keys inside Kubernetes
    # pass-through blocks (resources, probes, securityContext, ...) and list items are exempt.
    passthrough = re.compile(
        r"(resources|Probe|securityContext|podSecurityContext|strategy|hosts|tls|annotations|nodeSelector|"
        r"affinity|tolerations|labels|commonLabels|podLabels|podAnnotations|extraEnv|requests|limits)$"
    )
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    missing = []
    for n, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][A-Za-z0-9]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if not any(passthrough.search(k) for _, k in stack):
            prev = lines[n - 1].strip() if n else ""
            if not prev.startswith("#"):
                missing.append(".".join([k for _, k in stack] + [key]))
        stack.append((indent, key))
    assert not missing, f"values without a comment: {missing}"


# ------------------------------------------------------------------------------------------------ kinds


def test_default_values_render_expected_objects(default_render):
    r = default_render
    assert sorted(o["kind"] for o in r.objects) == sorted(
        [
            "ConfigMap",
            "Deployment",
            "Deployment",
            "Job",
            "PodDisruptionBudget",
            "PodDisruptionBudget",
            "Secret",
            "Service",
            "Service",
            "ServiceAccount",
        ]
    )
    for absent in (
        "Ingress",
        "HorizontalPodAutoscaler",
        "ScaledObject",
        "TriggerAuthentication",
        "ServiceMonitor",
    ):
        assert absent not in r.kinds
    assert r.one("Deployment", "api")["spec"]["replicas"] == 2
    assert r.one("Deployment", "worker")["spec"]["replicas"] == 1
    # CPU worker by default: no GPU resource at all
    assert "nvidia.com/gpu" not in json.dumps(container(r.one("Deployment", "worker"))["resources"])


def test_gpu_production_values_render_expected_objects(gpu_render):
    r = gpu_render
    for kind in (
        "Deployment",
        "Service",
        "Ingress",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ScaledObject",
        "TriggerAuthentication",
        "ServiceMonitor",
        "ConfigMap",
        "ServiceAccount",
        "Job",
    ):
        assert kind in r.kinds, kind
    assert "Secret" not in r.kinds  # existingSecret: the chart renders none
    # autoscalers own the replica counts
    assert "replicas" not in r.one("Deployment", "api")["spec"]
    assert "replicas" not in r.one("Deployment", "worker")["spec"]
    hpa = r.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == r.one("Deployment", "api")["metadata"]["name"]
    ing = r.one("Ingress")
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == r.one("Service", "api")["metadata"]["name"]
    sa = r.one("ServiceAccount")
    assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]
    sm = r.one("ServiceMonitor")
    assert {e["port"] for e in sm["spec"]["endpoints"]} == {"http", "metrics"}
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # images: API-only image for the API, the CUDA build for workers
    assert container(r.one("Deployment", "api"))["image"].endswith(":0.1.0-api")
    assert container(r.one("Deployment", "worker"))["image"].endswith(":0.1.0-cuda")


def test_optional_objects_can_be_switched_off(helm_template):
    r = helm_template(
        sets=[
            "api.pdb.enabled=false",
            "worker.pdb.enabled=false",
            "worker.metrics.service.enabled=false",
            "migrations.enabled=false",
            "serviceAccount.create=false",
        ]
    )
    assert {"PodDisruptionBudget", "Job", "ServiceAccount"}.isdisjoint(r.kinds)
    assert len(r.of_kind("Service")) == 1
    assert r.one("Deployment", "api")["spec"]["template"]["spec"]["serviceAccountName"] == "default"


# ------------------------------------------------------------------------------------------------ pods


def test_api_probes(default_render, gpu_render):
    for r in (default_render, gpu_render):
        c = container(r.one("Deployment", "api"))
        assert c["args"][:1] == ["serve"]
        (port,) = c["ports"]
        assert port["name"] == "http" and port["containerPort"] == 8000
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
        svc = r.one("Service", "api")
        assert svc["spec"]["ports"][0]["targetPort"] == "http"


def test_worker_gpu_scheduling_and_graceful_shutdown(gpu_render):
    w = gpu_render.one("Deployment", "worker")
    spec = w["spec"]["template"]["spec"]
    c = container(w)
    assert c["args"] == ["worker"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert c["resources"]["limits"]["memory"] == "96Gi"
    assert spec["terminationGracePeriodSeconds"] == 3600
    assert c["lifecycle"]["preStop"]["exec"]["command"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert "nodeAffinity" in spec["affinity"]
    env = {e["name"]: e for e in c["env"]}
    assert env["ALIGND_WORKER_CONCURRENCY"]["value"] == "1"
    assert env["ALIGND_WORKER_METRICS_PORT"]["value"] == "9100"
    assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert {"/tmp", "/var/lib/alignd", "/var/cache/alignd", "/dev/shm"} <= set(mounts)
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols[mounts["/var/cache/alignd"]]["emptyDir"]["sizeLimit"] == "200Gi"
    assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert gpu_render.one("PodDisruptionBudget", "worker")["spec"]["maxUnavailable"] == 1


def test_worker_methods_and_gpu_override(helm_template):
    r = helm_template(
        sets=[
            "worker.gpu.count=2",
            "worker.gpu.resourceName=nvidia.com/mig-3g.40gb",
            "worker.methods={sft,dpo}",
        ]
    )
    c = container(r.one("Deployment", "worker"))
    assert c["resources"]["limits"]["nvidia.com/mig-3g.40gb"] == 2
    assert {e["name"]: e.get("value") for e in c["env"]}["ALIGND_WORKER_METHODS"] == "sft,dpo"


def test_configmap_holds_non_secret_settings(gpu_render):
    cm = gpu_render.one("ConfigMap")["data"]
    assert cm["ALIGND_QUEUE"] == "arq"
    assert cm["ALIGND_STORAGE_URL"] == "s3://example-alignd-artifacts/prod"
    assert cm["ALIGND_S3_PRESIGN"] == "true"
    assert cm["ALIGND_DATA_DIR"] == "/var/lib/alignd"
    assert cm["HF_HUB_OFFLINE"] == "1"
    assert cm["ALIGND_MAX_DATASET_BYTES"] == "4294967296"
    assert all(isinstance(v, str) for v in cm.values())
    for key in cm:
        assert not re.search(r"URL$|KEY|PASSWORD", key) or key in (
            "ALIGND_STORAGE_URL",
            "ALIGND_S3_ENDPOINT_URL",
        )
    for d in ("api", "worker"):
        c = container(gpu_render.one("Deployment", d))
        assert c["envFrom"] == [{"configMapRef": {"name": gpu_render.one("ConfigMap")["metadata"]["name"]}}]


def test_migrations_job_is_a_pre_install_pre_upgrade_hook(default_render, gpu_render):
    for r in (default_render, gpu_render):
        job = r.one("Job", "migrations")
        ann = job["metadata"]["annotations"]
        assert set(ann["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
        assert "before-hook-creation" in ann["helm.sh/hook-delete-policy"].split(",")
        assert "hook-succeeded" in ann["helm.sh/hook-delete-policy"].split(",")
        spec = job["spec"]["template"]["spec"]
        assert spec["restartPolicy"] == "Never"
        assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["activeDeadlineSeconds"] > 0
        c = job["spec"]["template"]["spec"]["containers"][0]
        assert c["args"] == ["migrate"]
        # hooks run before the release's ConfigMap and ServiceAccount exist: no reference to them
        assert "envFrom" not in c
        assert spec["serviceAccountName"] == "default"
        assert spec["automountServiceAccountToken"] is False
    gpu_env = {e["name"]: e for e in container(gpu_render.one("Job", "migrations"))["env"]}
    assert gpu_env["ALIGND_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": EXISTING,
        "key": "database-url",
    }


def test_trial_migrations_get_a_hook_secret(helm_template):
    r = helm_template(sets=SECRET_SETS)
    hook_secret = [s for s in r.of_kind("Secret") if s["metadata"].get("annotations", {}).get("helm.sh/hook")]
    (hs,) = hook_secret
    assert int(hs["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        r.one("Job")["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    assert set(hs["data"]) == {"database-url"}
    env = {e["name"]: e for e in container(r.one("Job"))["env"]}
    assert env["ALIGND_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == hs["metadata"]["name"]


def test_pods_run_non_root_with_a_read_only_root_filesystem(default_render, gpu_render):
    for r in (default_render, gpu_render):
        specs = pod_specs(r)
        assert len(specs) == 3
        for name, spec in specs:
            psc = spec["securityContext"]
            assert psc["runAsNonRoot"] is True, name
            assert psc["runAsUser"] == 10001 and psc["runAsGroup"] == 10001 and psc["fsGroup"] == 10001
            assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert spec["automountServiceAccountToken"] is False
            for c in spec["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, name
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"]["drop"] == ["ALL"]
                assert "add" not in sc["capabilities"]
                assert c["resources"]["requests"] and c["resources"]["limits"], name
                mounts = {m["mountPath"] for m in c["volumeMounts"]}
                assert {"/tmp", "/var/lib/alignd"} <= mounts, name
            assert all("emptyDir" in v or "persistentVolumeClaim" in v for v in spec["volumes"])


# ------------------------------------------------------------------------------------------------ secrets


def test_existing_secret_leaves_no_plaintext_credential(helm_template):
    # Sample credentials given as values are ignored once existingSecret is set: nowhere in the output,
    # neither plain nor base64.
    r = helm_template(values=[GPU_VALUES], sets=SECRET_SETS)
    assert "Secret" not in r.kinds
    for fragment in SECRET_FRAGMENTS:
        assert fragment not in r.text
        assert base64.b64encode(fragment.encode()).decode()[:12] not in r.text
    for full in SAMPLE_SECRETS.values():
        assert base64.b64encode(full.encode()).decode() not in r.text
    refs = set()
    for o in r.objects:
        if o["kind"] not in ("Deployment", "Job"):
            continue
        for c in o["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                if "valueFrom" in e:
                    ref = e["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == EXISTING
                    refs.add((e["name"], ref["key"], ref.get("optional", False)))
                else:
                    assert not re.search(r"DATABASE_URL|REDIS_URL|API_KEYS|AWS_(ACCESS|SECRET)", e["name"]), e
    assert refs == {
        ("ALIGND_DATABASE_URL", "database-url", False),
        ("ALIGND_REDIS_URL", "redis-url", False),
        ("ALIGND_API_KEYS", "api-keys", False),
        ("AWS_ACCESS_KEY_ID", "aws-access-key-id", True),
        ("AWS_SECRET_ACCESS_KEY", "aws-secret-access-key", True),
    }
    trig = r.one("TriggerAuthentication")
    assert trig["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": EXISTING, "key": "redis-password"}
    ]


def test_trial_secret_keeps_credentials_out_of_pod_specs(helm_template):
    r = helm_template(sets=SECRET_SETS)
    secret = next(
        s for s in r.of_kind("Secret") if "helm.sh/hook" not in s["metadata"].get("annotations", {})
    )
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {
        "database-url": SAMPLE_SECRETS["secrets.databaseUrl"],
        "redis-url": SAMPLE_SECRETS["secrets.redisUrl"],
        "api-keys": SAMPLE_SECRETS["secrets.apiKeys"],
        "aws-access-key-id": SAMPLE_SECRETS["secrets.awsAccessKeyId"],
        "aws-secret-access-key": SAMPLE_SECRETS["secrets.awsSecretAccessKey"],
        "redis-password": SAMPLE_SECRETS["secrets.redisPassword"],
    }
    for fragment in SECRET_FRAGMENTS:
        assert fragment not in r.text  # only base64 inside Secret objects
    for o in r.objects:
        if o["kind"] == "Secret":
            continue
        text = " ".join(walk_strings(o))
        for full in SAMPLE_SECRETS.values():
            assert base64.b64encode(full.encode()).decode() not in text, o["kind"]
    # pods roll when the trial credentials change; the checksum is a hash, not the values
    ann = r.one("Deployment", "api")["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", ann["checksum/secret"])


def test_notes_render_offline(tools, tmp_path):
    """NOTES.txt through `helm install --dry-run=client` (needs no cluster): warnings only for trials."""
    env = {"KUBECONFIG": "/dev/null", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}

    def notes(*extra: str) -> str:
        proc = subprocess.run(
            [str(tools.helm), "install", "rel", str(CHART), "-n", "alignd", "--dry-run=client", *extra],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split("NOTES:", 1)[1]

    trial = notes()
    assert "WARNING: no existingSecret" in trial and "no API keys" in trial
    prod = notes("-f", str(GPU_VALUES), *[a for s in SECRET_SETS for a in ("--set", s)])
    assert "WARNING" not in prod
    assert "https://alignd.example.com" in prod and 'Secret "alignd-credentials"' in prod


# ------------------------------------------------------------------------------------------------ KEDA


def _methods() -> list[str]:
    jobs = pytest.importorskip("contract.methods")
    return [m.value for m in jobs.Method]


def _queue(method: str) -> str:
    arq_queue = pytest.importorskip("service.queue.arq")
    return arq_queue.queue_name(method)


def test_chart_knows_every_method():
    """The chart's method list (helpers, schema enum) is contract.methods.Method, in order."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    m = re.search(r'define "alignd.allMethods" -}}\n(.*)\n', helpers)
    assert m and m.group(1).split(",") == _methods()
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["worker"]["properties"]["methods"]["items"]["enum"] == _methods()


def test_keda_scales_workers_on_the_arq_queues_they_serve(gpu_render):
    so = gpu_render.one("ScaledObject")
    worker = gpu_render.one("Deployment", "worker")
    assert so["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert so["spec"]["minReplicaCount"] == 0 and so["spec"]["maxReplicaCount"] == 8
    triggers = so["spec"]["triggers"]
    # worker.methods is empty: every method, one redis trigger per arq queue (alignd:queue:<method>)
    assert [t["name"] for t in triggers] == _methods()
    assert [t["metadata"]["listName"] for t in triggers] == [_queue(m) for m in _methods()]
    for trigger in triggers:
        assert trigger["type"] == "redis"
        md = trigger["metadata"]
        assert md["address"] == "redis.internal:6379"
        assert md["listLength"] == "1"  # jobsPerWorker 0 -> worker.concurrency
        assert all(isinstance(v, str) for v in md.values())  # KEDA metadata is map[string]string
        assert (
            trigger["authenticationRef"]["name"]
            == gpu_render.one("TriggerAuthentication")["metadata"]["name"]
        )
    # combineQueues=sum: one composite metric, the total of the queues over jobs per worker
    mod = so["spec"]["advanced"]["scalingModifiers"]
    assert mod["formula"] == " + ".join(_methods())
    assert mod["target"] == "1" and mod["metricType"] == "AverageValue"
    # the worker polls exactly the queues the ScaledObject watches
    env = {e["name"]: e.get("value") for e in container(worker)["env"]}
    assert env["ALIGND_WORKER_METHODS"].split(",") == _methods()


def test_keda_triggers_follow_worker_methods(helm_template):
    base = ["worker.keda.enabled=true", "worker.keda.redis.address=r:6379", "worker.concurrency=2"]
    r = helm_template(sets=[*base, "worker.methods={ppo,rlhf}", "worker.keda.jobsPerWorker=3"])
    so = r.one("ScaledObject")
    assert [t["metadata"]["listName"] for t in so["spec"]["triggers"]] == [_queue("ppo"), _queue("rlhf")]
    assert {t["metadata"]["listLength"] for t in so["spec"]["triggers"]} == {"3"}
    assert so["spec"]["advanced"]["scalingModifiers"]["formula"] == "ppo + rlhf"
    assert "authenticationRef" not in so["spec"]["triggers"][0] and "TriggerAuthentication" not in r.kinds
    env = {e["name"]: e.get("value") for e in container(r.one("Deployment", "worker"))["env"]}
    assert env["ALIGND_WORKER_METHODS"] == "ppo,rlhf"
    # one method: a plain trigger, no scaling modifier; combineQueues=max: none either
    (single,) = helm_template(sets=[*base, "worker.methods={sft}"]).one("ScaledObject")["spec"]["triggers"]
    assert single["metadata"]["listName"] == _queue("sft") and single["metadata"]["listLength"] == "2"
    assert "advanced" not in helm_template(sets=[*base, "worker.methods={sft}"]).one("ScaledObject")["spec"]
    maxed = helm_template(sets=[*base, "worker.keda.combineQueues=max"]).one("ScaledObject")["spec"]
    assert "advanced" not in maxed and len(maxed["triggers"]) == len(_methods())


def test_worker_methods_are_always_explicit(default_render):
    # unset worker.methods still sets ALIGND_WORKER_METHODS: the chart's list, not the server's "unset = all",
    # decides which queues a pod polls (a method added to the server later is not silently half-served)
    env = {e["name"]: e.get("value") for e in container(default_render.one("Deployment", "worker"))["env"]}
    assert env["ALIGND_WORKER_METHODS"] == ",".join(_methods())


@pytest.mark.parametrize(
    ("override", "message"),
    [("worker.methods={sft,bogus}", "/worker/methods"), ("worker.keda.combineQueues=avg", "combineQueues")],
)
def test_schema_rejects_unknown_methods_and_combinations(tools, override, message):
    proc = run_helm(tools, "template", "rel", str(CHART), "--set", override)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr


def test_worker_probes(default_render, gpu_render, helm_template):
    for r in (default_render, gpu_render):
        c = container(r.one("Deployment", "worker"))
        # readiness: `alignd-server worker --check` (Redis answers and the pool's queues have a fresh arq
        # health-check key); never liveness, which would restart training runs on a Redis outage
        assert c["readinessProbe"]["exec"]["command"] == ["alignd-server", "worker", "--check"]
        assert c["readinessProbe"]["timeoutSeconds"] >= 10  # python start-up + redis socket timeout (5 s)
        assert c["readinessProbe"]["periodSeconds"] * c["readinessProbe"]["failureThreshold"] > 31
        assert "exec" not in c["livenessProbe"] and "exec" not in c["startupProbe"]
        assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
        assert c["startupProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    off = helm_template(sets=["worker.readinessProbe=null"])
    assert "readinessProbe" not in container(off.one("Deployment", "worker"))


def test_production_settings_reach_the_configmap(helm_template):
    settings_mod = pytest.importorskip("service.settings")
    cm = helm_template(values=[POOLS_VALUES]).one("ConfigMap")["data"]
    assert cm["ALIGND_LEASE_SECONDS"] == "60" and cm["ALIGND_HEARTBEAT_SECONDS"] == "5"
    assert cm["ALIGND_JOB_MAX_TRIES"] == "3" and cm["ALIGND_JOB_TIMEOUT_SECONDS"] == "86400"
    assert "ALIGND_TORCH_THREADS" not in cm  # 0: torch's default
    # every ALIGND_* name the chart sets is a real Settings field, and the values parse as Settings
    fields = {f"ALIGND_{name.upper()}" for name in settings_mod.Settings.model_fields}
    assert {k for k in cm if k.startswith("ALIGND_")} <= fields
    # defaults in values.yaml are Settings' own defaults
    defaults = helm_template().one("ConfigMap")["data"]
    parsed = settings_mod.Settings(
        **{k.removeprefix("ALIGND_").lower(): v for k, v in defaults.items() if k.startswith("ALIGND_")}
    )
    reference = settings_mod.Settings()
    for name in (
        "lease_seconds",
        "heartbeat_seconds",
        "reconcile_interval_seconds",
        "job_timeout_seconds",
        "job_max_tries",
        "db_retry_seconds",
        "cancel_grace_seconds",
        "max_queued_jobs_per_tenant",
    ):
        assert getattr(parsed, name) == getattr(reference, name), name


def test_template_refuses_a_heartbeat_not_below_the_lease(tools):
    proc = run_helm(
        tools,
        "template",
        "rel",
        str(CHART),
        "--set",
        "config.leaseSeconds=5",
        "--set",
        "config.heartbeatSeconds=5",
    )
    assert proc.returncode != 0 and "heartbeatSeconds" in proc.stderr


# ------------------------------------------------------------------------------------------------ worker pools


def _pool(r: Rendered, kind: str, pool: str) -> dict:
    (found,) = [o for o in r.of_kind(kind) if o["metadata"]["labels"].get("alignd.dev/worker-pool") == pool]
    return found


def test_worker_pools_render_one_deployment_pdb_and_scaledobject_each(helm_template):
    r = helm_template(values=[POOLS_VALUES])
    assert len(r.of_kind("Deployment")) == 3  # api + two pools
    gen, train = _pool(r, "Deployment", "generate"), _pool(r, "Deployment", "train")
    assert gen["metadata"]["name"] == "rel-alignd-worker-generate"
    assert train["metadata"]["name"] == "rel-alignd-worker-train"
    for d, pool in ((gen, "generate"), (train, "train")):
        sel = d["spec"]["selector"]["matchLabels"]
        assert sel["alignd.dev/worker-pool"] == pool and sel["app.kubernetes.io/component"] == "worker"
        assert d["spec"]["template"]["metadata"]["labels"]["alignd.dev/worker-pool"] == pool
        pdb = _pool(r, "PodDisruptionBudget", pool)
        assert pdb["spec"]["selector"]["matchLabels"] == sel
        so = _pool(r, "ScaledObject", pool)
        assert so["spec"]["scaleTargetRef"]["name"] == d["metadata"]["name"]
        assert _pool(r, "TriggerAuthentication", pool)["metadata"]["name"] == d["metadata"]["name"]
        assert "replicas" not in d["spec"]
    # generate: CPU, two jobs at a time, its own queue only, never scaled to zero
    gc = container(gen)
    genv = {e["name"]: e.get("value") for e in gc["env"]}
    assert genv["ALIGND_WORKER_METHODS"] == "generate" and genv["ALIGND_WORKER_CONCURRENCY"] == "2"
    assert "nvidia.com/gpu" not in json.dumps(gc["resources"])
    assert "nodeSelector" not in gen["spec"]["template"]["spec"]
    assert gc["image"].endswith(":0.1.0")
    gso = _pool(r, "ScaledObject", "generate")["spec"]
    assert [t["metadata"]["listName"] for t in gso["triggers"]] == [_queue("generate")]
    assert gso["minReplicaCount"] == 1 and gso["maxReplicaCount"] == 6
    assert gso["cooldownPeriod"] == 900  # inherited from worker.keda
    assert gso["triggers"][0]["metadata"]["listLength"] == "2"
    # train: GPU, training methods, the CUDA image
    tc = container(train)
    tenv = {e["name"]: e.get("value") for e in tc["env"]}
    training = [m for m in _methods() if m != "generate"]
    assert tenv["ALIGND_WORKER_METHODS"].split(",") == training
    assert tc["resources"]["limits"]["nvidia.com/gpu"] == 1 and tc["image"].endswith(":0.1.0-cuda")
    assert train["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    tso = _pool(r, "ScaledObject", "train")["spec"]
    assert [t["metadata"]["listName"] for t in tso["triggers"]] == [_queue(m) for m in training]
    assert tso["minReplicaCount"] == 0 and tso["maxReplicaCount"] == 8
    # one metrics Service for all pools; together the pools serve every method exactly once
    (svc,) = [s for s in r.of_kind("Service") if s["metadata"]["name"].endswith("-worker-metrics")]
    assert "alignd.dev/worker-pool" not in svc["spec"]["selector"]
    assert sorted(genv["ALIGND_WORKER_METHODS"].split(",") + training) == sorted(_methods())


def test_worker_pools_lint_and_validate(tools, helm_template):
    proc = run_helm(tools, "lint", str(CHART), "--strict", "-f", str(POOLS_VALUES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dup = run_helm(
        tools,
        "template",
        "rel",
        str(CHART),
        "--set",
        "workerPools[0].name=a",
        "--set",
        "workerPools[1].name=a",
    )
    assert dup.returncode != 0 and "two pools" in dup.stderr
    bad = run_helm(tools, "template", "rel", str(CHART), "--set", "workerPools[0].name=A_b")
    assert bad.returncode != 0 and "workerPools" in bad.stdout + bad.stderr
    nokeda = run_helm(
        tools,
        "template",
        "rel",
        str(CHART),
        "--set",
        "workerPools[0].name=a",
        "--set",
        "workerPools[0].keda.enabled=true",
    )
    assert nokeda.returncode != 0 and "workerPools[a]" in nokeda.stderr


def test_a_pool_zero_value_overrides_the_worker_default(helm_template):
    # sprig's merge would keep worker.gpu.count=1 for a pool saying 0; the chart's overlay must not
    r = helm_template(
        sets=[
            "worker.gpu.count=1",
            "workerPools[0].name=cpu",
            "workerPools[0].gpu.count=0",
            "workerPools[0].methods={generate}",
        ]
    )
    c = container(_pool(r, "Deployment", "cpu"))
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    assert r.one("Deployment", "worker") is not None  # component label: the single pool is gone
    assert [d["metadata"]["name"] for d in r.of_kind("Deployment") if "worker" in d["metadata"]["name"]] == [
        "rel-alignd-worker-cpu"
    ]


def test_notes_name_methods_no_pool_serves(tools, tmp_path):
    env = {"KUBECONFIG": "/dev/null", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [
            str(tools.helm),
            "install",
            "rel",
            str(CHART),
            "--dry-run=client",
            "--set",
            "worker.methods={sft,dpo}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "rel-alignd-worker serves sft,dpo" in notes
    unserved = ",".join(m for m in _methods() if m not in ("sft", "dpo"))
    assert f"no worker pool of this release serves {unserved}" in notes


# ------------------------------------------------------------------------------------------------ k8s schemas


@pytest.mark.parametrize("k8s_version", ["1.29", "1.33"])
def test_manifests_validate_against_kubernetes_schemas(
    default_render, gpu_render, helm_template, k8s_version
):
    """Offline OpenAPI validation of every built-in object (strict: unknown fields fail).

    kubectl cannot do this here: `kubectl apply/create --dry-run=client` still needs API discovery from a
    server (it fails with "couldn't get current server API group list"), and there is no cluster.
    """
    kv = pytest.importorskip(
        "kubernetes_validate", reason="add kubernetes-validate to the dev extra for offline schema checks"
    )
    renders = [
        default_render,
        gpu_render,
        helm_template(sets=SECRET_SETS),
        helm_template(values=[POOLS_VALUES]),
        helm_template(values=[MULTI_NODE_VALUES]),
    ]
    checked = 0
    for r in renders:
        for o in r.objects:
            if o["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/")):
                continue  # CRDs: not in the upstream schemas
            kv.validate(o, k8s_version, strict=True)
            checked += 1
    assert checked >= 25


def test_kubectl_client_needs_a_cluster(tools, default_render, tmp_path):
    """Documents why kubectl is not used for validation: client-side dry-run still asks a server."""
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(default_render.text)
    proc = subprocess.run(
        [
            str(tools.kubectl),
            "apply",
            "--dry-run=client",
            "--validate=false",
            "-o",
            "name",
            "-s",
            "http://127.0.0.1:9",
            "-f",
            str(manifest),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"KUBECONFIG": "/dev/null", "HOME": str(tmp_path)},
    )
    if proc.returncode == 0:  # a kubectl that works offline: then use it
        assert "deployment.apps/rel-alignd-api" in proc.stdout
    else:
        assert "server" in proc.stderr.lower() or "connection refused" in proc.stderr


# ------------------------------------------------------------------------------------------------ tools


def test_fetch_tools_is_idempotent(tools):
    before = {p.name: p.stat().st_mtime_ns for p in TOOLS_BIN.iterdir()}
    proc = subprocess.run(["bash", str(FETCH_TOOLS)], capture_output=True, text=True, timeout=60, check=True)
    assert Path(proc.stdout.strip()) == TOOLS_BIN
    assert {p.name: p.stat().st_mtime_ns for p in TOOLS_BIN.iterdir()} == before
    version = subprocess.run(
        [str(tools.helm), "version", "--short"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("v4.")
    assert ".tools/" in (REPO / ".gitignore").read_text()
