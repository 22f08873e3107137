"""The Helm chart with the real helm binary: lint, every CI scenario, the values schema, and
an install into the local control plane whose RBAC is checked with SubjectAccessReviews."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import contract
from kubetune.devcluster.binaries import find_binaries, require
from kubetune.operator import builders
from kubetune.operator.settings import OperatorSettings
from tests.plans import plan_document
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
CRD_FILE = ROOT / "crds" / "kubetune.dev_finetunejobs.yaml"
CRD_NAME = "finetunejobs.kubetune.dev"
SCENARIOS = sorted((CHART / "ci").glob("*.yaml"))


def helm(*args: str, kubeconfig: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = find_binaries().helm
    require([binary])
    cmd = [str(binary), *args]
    if kubeconfig:
        cmd += ["--kubeconfig", kubeconfig]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


def template(*args: str) -> list[dict[str, Any]]:
    result = helm("template", "rel", str(CHART), "--namespace", "kubetune-system", *args)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_helm_lint_strict_is_clean() -> None:
    result = helm("lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr
    for scenario in SCENARIOS:
        result = helm("lint", "--strict", str(CHART), "-f", str(scenario))
        assert result.returncode == 0, f"{scenario.name}: {result.stdout}{result.stderr}"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.stem for s in SCENARIOS])
def test_every_ci_scenario_renders(scenario: Path) -> None:
    docs = template("-f", str(scenario))
    values = yaml.safe_load(scenario.read_text()) or {}
    [deploy] = by_kind(docs, "Deployment")
    spec = deploy["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["port"] == "health"
    assert container["resources"]["requests"]
    # The environment is what OperatorSettings reads.
    env = {e["name"]: e["value"] for e in container["env"]}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        settings = OperatorSettings.from_env()
    assert settings.trainer_image == env["KUBETUNE_TRAINER_IMAGE"]
    assert settings.sync_interval_seconds == 15
    watch = values.get("watchNamespaces") or []
    assert settings.watch_namespaces == tuple(watch)
    if watch:
        assert [f"--namespace={ns}" for ns in watch] == [
            a for a in container["args"] if a.startswith("--namespace")
        ]
        assert by_kind(docs, "ClusterRoleBinding")[0]["roleRef"]["name"].endswith("-framework")
        assert len(by_kind(docs, "ClusterRoleBinding")) == 1
    else:
        assert "--all-namespaces" in container["args"]
    crds = by_kind(docs, "CustomResourceDefinition")
    assert len(crds) == (0 if values.get("crds", {}).get("install") is False else 1)
    if values.get("imagePullSecrets"):
        assert pod["imagePullSecrets"] == values["imagePullSecrets"]
    if values.get("image", {}).get("digest"):
        assert container["image"].endswith("@" + values["image"]["digest"])
    if values.get("tolerations"):
        assert pod["tolerations"] == values["tolerations"]
    monitors = values.get("metrics", {})
    assert len(by_kind(docs, "PodMonitor")) == int(
        bool(monitors.get("podMonitor", {}).get("enabled"))
    )
    assert len(by_kind(docs, "ServiceMonitor")) == int(
        bool(monitors.get("serviceMonitor", {}).get("enabled"))
    )
    dash = values.get("grafana", {}).get("dashboard", {})
    configmaps = by_kind(docs, "ConfigMap")
    if dash.get("enabled", True):
        [cm] = configmaps
        assert cm["metadata"]["labels"][dash.get("label", "grafana_dashboard")] == dash.get(
            "labelValue", "1"
        )
        assert json.loads(cm["data"]["kubetune.json"]) == json.loads(
            (CHART / "dashboards" / "kubetune.json").read_text()
        )
    else:
        assert configmaps == []
    # Secret rights live in one ClusterRole, which is only ever bound per namespace.
    for role in by_kind(docs, "ClusterRole"):
        if not role["metadata"]["name"].endswith("-job-secrets"):
            assert all("secrets" not in r["resources"] for r in role["rules"])
    for binding in by_kind(docs, "ClusterRoleBinding"):
        assert not binding["roleRef"]["name"].endswith("-job-secrets")


def test_the_rendered_crd_is_the_one_in_crds() -> None:
    # The chart's copy; tests/unit/test_chart.py checks it is byte-for-byte crds/'s file.
    [crd] = by_kind(template(), "CustomResourceDefinition")
    source = yaml.safe_load((CHART / "files" / "crds" / CRD_FILE.name).read_text())
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert crd["spec"] == source["spec"]
    assert crd["metadata"]["name"] == source["metadata"]["name"]
    assert source["metadata"]["labels"].items() <= crd["metadata"]["labels"].items()
    [crd] = by_kind(template("--set", "crds.keep=false"), "CustomResourceDefinition")
    assert "annotations" not in crd["metadata"]


def test_the_pod_monitor_selects_training_pods_and_their_metrics_port() -> None:
    docs = template("--set", "metrics.podMonitor.enabled=true")
    [monitor] = by_kind(docs, "PodMonitor")
    ref = builders.JobRef(name="demo", namespace="team-a", uid="u")
    pod_labels = builders.labels(ref, "train")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # The prepare pod is not selected.
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= (
        builders.labels(ref, "prepare").items()
    )
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    from kubetune.api import parse_job

    spec = parse_job(
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "demo"},
            "spec": {
                "model": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
                "dataset": {"uri": "configmap://demo-data/train.jsonl"},
            },
        }
    ).spec
    job = builders.training_job(ref, spec, plan_document(), OperatorSettings())
    [container] = job["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert endpoint["port"] in ports
    assert ports[endpoint["port"]] == OperatorSettings().trainer_metrics_port
    label_key = "__meta_kubernetes_pod_label_" + contract.JOB_LABEL.replace(".", "_").replace(
        "/", "_"
    )
    assert any(r.get("sourceLabels") == [label_key] for r in endpoint["relabelings"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "nosuchkey=1"], "additional properties 'nosuchkey' not allowed"),
        (["--set", "operator.nosuch=1"], "additional properties 'nosuch' not allowed"),
        (["--set", "crds.install=yes"], "want boolean"),
        (["--set", "operator.metricsPort=http"], "want integer"),
        (["--set", "operator.metricsPort=70000"], "maximum"),
        (["--set", "image.pullPolicy=Sometimes"], "value must be one of"),
        (["--set", "watchNamespaces[0]=Team_A"], "does not match pattern"),
        (["--set", "metrics.podMonitor.interval=fast"], "does not match pattern"),
        (["--set-json", 'tolerations=[{"key":"a","operater":"Exists"}]'], "operater"),
    ],
)
def test_the_values_schema_rejects_unknown_and_mistyped_values(
    args: list[str], message: str
) -> None:
    result = helm("template", "rel", str(CHART), *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# ------------------------------------------------------------------ install, for real
def _adopt_existing_crd(api_client: Any, release: str, namespace: str) -> None:
    """Other cluster tests may have applied crds/ already: let Helm adopt it, as a user who
    applied the CRD by hand before installing the chart would (docs/install.md)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    ext = client.ApiextensionsV1Api(api_client)
    try:
        ext.read_custom_resource_definition(CRD_NAME)
    except ApiException as exc:
        if exc.status == 404:
            return
        raise
    ext.patch_custom_resource_definition(
        CRD_NAME,
        {
            "metadata": {
                "labels": {"app.kubernetes.io/managed-by": "Helm"},
                "annotations": {
                    "meta.helm.sh/release-name": release,
                    "meta.helm.sh/release-namespace": namespace,
                },
            }
        },
    )


def _new_namespace(core: Any) -> str:
    name = f"h-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    return name


@pytest.fixture(scope="module")
def installed(dev_cluster: Any, api_client: Any) -> Iterator[dict[str, Any]]:
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    kubeconfig = str(dev_cluster.layout.kubeconfig)
    release_ns, jobs_ns, other_ns = (_new_namespace(core) for _ in range(3))
    release = "kt"
    _adopt_existing_crd(api_client, release, release_ns)
    result = helm(
        "install",
        release,
        str(CHART),
        "--namespace",
        release_ns,
        "--set",
        f"rbac.jobNamespaces={{{jobs_ns}}}",
        kubeconfig=kubeconfig,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    info = {
        "release": release,
        "release_ns": release_ns,
        "jobs_ns": jobs_ns,
        "other_ns": other_ns,
        "kubeconfig": kubeconfig,
        "notes": result.stdout,
        "sa": f"system:serviceaccount:{release_ns}:{release}-kubetune",
    }
    try:
        yield info
    finally:
        helm("uninstall", release, "--namespace", release_ns, kubeconfig=kubeconfig)
        for ns in (release_ns, jobs_ns, other_ns):
            core.delete_namespace(ns)


def test_helm_install_establishes_the_crd_and_creates_the_operator(
    installed: dict[str, Any], api_client: Any
) -> None:
    from kubernetes import client

    ext = client.ApiextensionsV1Api(api_client)

    def established() -> bool:
        crd = ext.read_custom_resource_definition(CRD_NAME)
        return any(
            c.type == "Established" and c.status == "True" for c in crd.status.conditions or []
        )

    wait_for(established, 30, "the CRD to be Established")
    ns = installed["release_ns"]
    deploy = client.AppsV1Api(api_client).read_namespaced_deployment(
        f"{installed['release']}-kubetune", ns
    )
    assert deploy.spec.replicas == 1
    assert deploy.spec.strategy.type == "Recreate"
    client.CoreV1Api(api_client).read_namespaced_service_account(
        f"{installed['release']}-kubetune", ns
    )
    client.CoreV1Api(api_client).read_namespaced_service(
        f"{installed['release']}-kubetune-metrics", ns
    )
    rbac = client.RbacAuthorizationV1Api(api_client)
    for suffix in ("framework", "jobs", "job-secrets"):
        rbac.read_cluster_role(f"{installed['release']}-kubetune-{suffix}")
    rbac.read_namespaced_role_binding(
        f"{installed['release']}-kubetune-job-secrets", installed["jobs_ns"]
    )
    assert "create rolebinding" not in installed["notes"]  # jobNamespaces was given

    # A FineTuneJob applied after the install is accepted by the API server.
    job = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "after-helm"},
        "spec": {
            "model": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
            "dataset": {"uri": "configmap://after-helm-data/train.jsonl"},
            "planOnly": True,
        },
    }
    custom = client.CustomObjectsApi(api_client)
    custom.create_namespaced_custom_object(
        "kubetune.dev", "v1alpha1", installed["jobs_ns"], "finetunejobs", job
    )
    got = custom.get_namespaced_custom_object(
        "kubetune.dev", "v1alpha1", installed["jobs_ns"], "finetunejobs", "after-helm"
    )
    assert got["spec"]["earlyStopping"]["patience"] == 3  # schema defaults applied


def test_the_operator_account_can_do_what_it_needs_and_no_more(
    installed: dict[str, Any], api_client: Any
) -> None:
    sa, jobs_ns, other_ns = installed["sa"], installed["jobs_ns"], installed["other_ns"]

    def can(verb: str, resource: str, ns: str = "", group: str = "", sub: str = "") -> bool:
        from kubernetes import client

        attrs: dict[str, Any] = {"verb": verb, "resource": resource, "group": group}
        if ns:
            attrs["namespace"] = ns
        if sub:
            attrs["subresource"] = sub
        review = client.AuthorizationV1Api(api_client).create_subject_access_review(
            {
                "spec": {
                    "user": sa,
                    "groups": ["system:serviceaccounts"],
                    "resourceAttributes": attrs,
                }
            }
        )
        return bool(review.status.allowed)

    needed = [
        # Framework (Kopf): CRD discovery, events.
        ("list", "customresourcedefinitions", "", "apiextensions.k8s.io", ""),
        ("watch", "customresourcedefinitions", "", "apiextensions.k8s.io", ""),
        ("create", "events", jobs_ns, "", ""),
        # Application: watching and reconciling FineTuneJobs in every namespace.
        ("list", "events", jobs_ns, "", ""),  # a child Job's FailedCreate
        ("list", "finetunejobs", "", "kubetune.dev", ""),
        ("watch", "finetunejobs", "", "kubetune.dev", ""),
        ("patch", "finetunejobs", other_ns, "kubetune.dev", ""),
        ("delete", "finetunejobs", other_ns, "kubetune.dev", ""),
        ("patch", "finetunejobs", jobs_ns, "kubetune.dev", "status"),
        ("list", "jobs", "", "batch", ""),
        ("watch", "jobs", "", "batch", ""),
        ("create", "jobs", jobs_ns, "batch", ""),
        ("patch", "jobs", jobs_ns, "batch", ""),
        ("delete", "jobs", jobs_ns, "batch", ""),  # a multi-node gang's restart
        ("list", "pods", jobs_ns, "", ""),
        ("create", "services", jobs_ns, "", ""),
        ("get", "services", jobs_ns, "", ""),
        ("create", "configmaps", jobs_ns, "", ""),
        ("patch", "configmaps", jobs_ns, "", ""),
        ("get", "configmaps", jobs_ns, "", ""),
        ("list", "nodes", "", "", ""),
        ("watch", "nodes", "", "", ""),  # the node cache
        # Kueue: Workloads, LocalQueues and a waiting Workload's position.
        ("patch", "workloads", jobs_ns, "kueue.x-k8s.io", ""),
        ("get", "localqueues", jobs_ns, "kueue.x-k8s.io", ""),
        ("get", "localqueues", jobs_ns, "visibility.kueue.x-k8s.io", "pendingworkloads"),
        # Secrets: the control token, only in the job namespaces.
        ("create", "secrets", jobs_ns, "", ""),
        ("get", "secrets", jobs_ns, "", ""),
    ]
    refused = [
        ("get", "secrets", "", "", ""),
        ("list", "secrets", "", "", ""),
        ("watch", "secrets", "", "", ""),
        ("get", "secrets", other_ns, "", ""),
        ("create", "secrets", other_ns, "", ""),
        ("get", "secrets", installed["release_ns"], "", ""),
        ("get", "secrets", "kube-system", "", ""),
        ("list", "secrets", jobs_ns, "", ""),
        ("watch", "secrets", jobs_ns, "", ""),
        ("delete", "secrets", jobs_ns, "", ""),
        ("update", "secrets", jobs_ns, "", ""),
        ("create", "pods", jobs_ns, "", ""),
        ("delete", "pods", jobs_ns, "", ""),
        ("create", "customresourcedefinitions", "", "apiextensions.k8s.io", ""),
        ("update", "customresourcedefinitions", "", "apiextensions.k8s.io", ""),
        ("create", "clusterroles", "", "rbac.authorization.k8s.io", ""),
        ("create", "rolebindings", jobs_ns, "rbac.authorization.k8s.io", ""),
        ("patch", "nodes", "", "", ""),
        ("create", "finetunejobs", jobs_ns, "kubetune.dev", ""),
    ]
    assert [r for r in needed if not can(*r)] == []
    assert [r for r in refused if can(*r)] == []


def test_a_namespaced_install_grants_nothing_outside_its_namespaces(
    installed: dict[str, Any], api_client: Any
) -> None:
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    release_ns, team_ns = _new_namespace(core), _new_namespace(core)
    kubeconfig = installed["kubeconfig"]
    result = helm(
        "install",
        "scoped",
        str(CHART),
        "--namespace",
        release_ns,
        "--set",
        "crds.install=false",
        "--set",
        f"watchNamespaces={{{team_ns}}}",
        kubeconfig=kubeconfig,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sa = f"system:serviceaccount:{release_ns}:scoped-kubetune"
    try:

        def can(verb: str, resource: str, ns: str = "", group: str = "") -> bool:
            attrs: dict[str, Any] = {"verb": verb, "resource": resource, "group": group}
            if ns:
                attrs["namespace"] = ns
            review = client.AuthorizationV1Api(api_client).create_subject_access_review(
                {"spec": {"user": sa, "resourceAttributes": attrs}}
            )
            return bool(review.status.allowed)

        assert can("watch", "finetunejobs", team_ns, "kubetune.dev")
        assert can("create", "jobs", team_ns, "batch")
        assert can("create", "secrets", team_ns)
        assert can("list", "customresourcedefinitions", "", "apiextensions.k8s.io")
        assert not can("list", "finetunejobs", "", "kubetune.dev")
        assert not can("watch", "finetunejobs", installed["jobs_ns"], "kubetune.dev")
        assert not can("create", "jobs", installed["jobs_ns"], "batch")
        assert not can("get", "secrets", installed["jobs_ns"])
        assert not can("get", "secrets", "")
    finally:
        helm("uninstall", "scoped", "--namespace", release_ns, kubeconfig=kubeconfig)
        core.delete_namespace(release_ns)
        core.delete_namespace(team_ns)


def test_uninstall_keeps_the_crd(dev_cluster: Any, api_client: Any) -> None:
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    ns = _new_namespace(core)
    kubeconfig = str(dev_cluster.layout.kubeconfig)
    _adopt_existing_crd(api_client, "keeper", ns)
    try:
        result = helm("install", "keeper", str(CHART), "--namespace", ns, kubeconfig=kubeconfig)
        assert result.returncode == 0, result.stderr
        result = helm("uninstall", "keeper", "--namespace", ns, kubeconfig=kubeconfig)
        assert result.returncode == 0, result.stderr
        assert "kept due to the resource policy" in result.stdout + result.stderr
        client.ApiextensionsV1Api(api_client).read_custom_resource_definition(CRD_NAME)
    finally:
        core.delete_namespace(ns)
