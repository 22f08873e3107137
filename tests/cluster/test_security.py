"""Security against the real local control plane: what the trainer pods' service account
may do (SubjectAccessReviews), the chart's leader-election rights, Pod Security `restricted`
admission of the pods the operator builds, the control token (owned by its job, useless
for another job, never logged), and a hub token never copied anywhere."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.operator import builders as b
from kubetune.operator.settings import OperatorSettings
from tests.cluster.test_faults import OperatorSubprocess
from tests.cluster.test_operator import GROUP, PLURAL, VERSION, _create, _ftj, _get, _wait_cond
from tests.plans import plan_document
from tests.unit.specs import spec_from
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

CHART = Path(__file__).resolve().parents[2] / "charts" / "kubetune"


def _can(api_client: Any, user: str, verb: str, resource: str, ns: str = "", **extra: str) -> bool:
    attrs: dict[str, Any] = {"verb": verb, "resource": resource, **extra}
    if ns:
        attrs["namespace"] = ns
    review = client.AuthorizationV1Api(api_client).create_subject_access_review(
        {
            "spec": {
                "user": user,
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns or 'x'}"],
                "resourceAttributes": attrs,
            }
        }
    )
    return bool(review.status.allowed)


def _train_spec(ns: str, **extra: Any) -> Any:
    base = {
        "model": {"uri": "hf://meta-llama/Llama-2-7b-hf", "secretRef": {"name": "hf-token"}},
        "dataset": {"uri": "configmap://d/train.jsonl"},
        "output": {"uri": "pvc://models/out"},
        "resources": {"numNodes": 2, "gpusPerNode": 8},
    }
    return spec_from(base, "sec", ns, **extra)


PLAN = plan_document()


def test_trainer_pods_get_no_token_and_their_account_no_api_rights(
    api_client: Any, namespace: str
) -> None:
    ref = b.JobRef("sec", namespace, "uid-1")
    spec = _train_spec(namespace)
    settings = OperatorSettings()
    for job in (b.training_job(ref, spec, PLAN, settings), b.prepare_job(ref, spec, settings, 80)):
        pod = job["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert "serviceAccountName" not in pod  # the namespace's default account
    user = f"system:serviceaccount:{namespace}:default"
    denied = [
        (verb, resource, group)
        for resource, group in [
            ("secrets", ""),
            ("configmaps", ""),
            ("pods", ""),
            ("services", ""),
            ("jobs", "batch"),
            ("finetunejobs", "kubetune.dev"),
            ("leases", "coordination.k8s.io"),
        ]
        for verb in ("get", "list", "watch", "create", "update", "patch", "delete")
    ]
    allowed = [r for r in denied if _can(api_client, user, r[0], r[1], namespace, group=r[2])]
    assert allowed == []
    assert not _can(api_client, user, "list", "secrets")  # nor cluster-wide
    assert not _can(api_client, user, "list", "nodes")


def _helm(dev_cluster: Any, *args: str) -> str:
    return subprocess.run(
        [str(dev_cluster.bins.helm), *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


@pytest.mark.skipif(not (CHART / "Chart.yaml").exists(), reason="no Helm chart yet")
def test_the_chart_lets_the_operator_hold_only_its_own_lease(
    dev_cluster: Any, api_client: Any, namespace: str
) -> None:
    docs = [
        d
        for d in yaml.safe_load_all(
            _helm(
                dev_cluster,
                "template",
                "r",
                str(CHART),
                "-n",
                namespace,
                "-s",
                "templates/leader-election.yaml",
                "-s",
                "templates/serviceaccount.yaml",
            )
        )
        if d
    ]
    rbac = client.RbacAuthorizationV1Api(api_client)
    core = client.CoreV1Api(api_client)
    for d in docs:
        if d["kind"] == "ServiceAccount":
            core.create_namespaced_service_account(namespace, d)
            sa = f"system:serviceaccount:{namespace}:{d['metadata']['name']}"
        elif d["kind"] == "Role":
            rbac.create_namespaced_role(namespace, d)
        elif d["kind"] == "RoleBinding":
            rbac.create_namespaced_role_binding(namespace, d)

    def can(verb: str, ns: str = namespace, name: str = "kubetune-operator") -> bool:
        return _can(api_client, sa, verb, "leases", ns, group="coordination.k8s.io", name=name)

    wait_for(lambda: can("get"), 10, "the RoleBinding to apply")
    assert can("create")
    assert can("update")
    assert not can("update", name="someone-else")
    assert not can("delete")
    assert not can("list", name="")
    assert not can("get", ns="kube-system")
    assert not can("update", ns="default")


def _restricted_namespace(api_client: Any, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    core.patch_namespace(
        namespace,
        {
            "metadata": {
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                }
            }
        },
    )


def _admitted(api_client: Any, namespace: str, template: dict[str, Any]) -> str | None:
    """None when a pod from this template is admitted (server-side dry run), else why not."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe", "namespace": namespace},
        "spec": template["spec"],
    }
    try:
        client.CoreV1Api(api_client).create_namespaced_pod(namespace, pod, dry_run="All")
    except ApiException as exc:
        return str(json.loads(exc.body).get("message"))
    return None


def test_trainer_and_prepare_pods_are_admitted_under_the_restricted_standard(
    api_client: Any, namespace: str
) -> None:
    _restricted_namespace(api_client, namespace)
    ref = b.JobRef("sec", namespace, "uid-1")
    settings = OperatorSettings()
    for gpus in (8, 0):
        spec = _train_spec(namespace, resources={"numNodes": 2, "gpusPerNode": gpus})
        train = b.training_job(ref, spec, PLAN, settings)["spec"]["template"]
        prepare = b.prepare_job(ref, spec, settings, 80)["spec"]["template"]
        assert _admitted(api_client, namespace, train) is None
        assert _admitted(api_client, namespace, prepare) is None
    # The default output (a file:// hostPath, meant for the dev cluster) is not allowed
    # under `baseline` or `restricted`: such namespaces need spec.output.uri set to a PVC.
    spec = spec_from(
        {"model": {"uri": "hf://gpt2"}, "dataset": {"uri": "configmap://d/t.jsonl"}},
        "sec",
        namespace,
    )
    refused = _admitted(
        api_client, namespace, b.training_job(ref, spec, PLAN, settings)["spec"]["template"]
    )
    assert refused is not None
    assert 'volume "output-host" uses restricted volume type "hostPath"' in refused


@pytest.mark.skipif(not (CHART / "Chart.yaml").exists(), reason="no Helm chart yet")
def test_the_operator_pod_of_the_chart_is_admitted_under_the_restricted_standard(
    dev_cluster: Any, api_client: Any, namespace: str
) -> None:
    _restricted_namespace(api_client, namespace)
    docs = yaml.safe_load_all(
        _helm(
            dev_cluster,
            "template",
            "r",
            str(CHART),
            "-n",
            namespace,
            "-s",
            "templates/deployment.yaml",
        )
    )
    (deployment,) = [d for d in docs if d and d["kind"] == "Deployment"]
    template = deployment["spec"]["template"]
    template["spec"]["serviceAccountName"] = "default"
    assert _admitted(api_client, namespace, template) is None


def _token(api: dict[str, Any], ns: str, name: str) -> str:
    import base64

    secret = api["core"].read_namespaced_secret(f"{name}-control", ns)
    return base64.b64decode(secret.data["token"]).decode()


def test_tokens_are_per_job_owned_and_never_copied_or_logged(
    dev_cluster: Any, crd_installed: str, api: dict[str, Any], namespace: str, tmp_path: Path
) -> None:
    """Two running jobs with a hub token: each has its own control token in a Secret owned
    by the job; rank 0's control endpoint refuses no token and the other job's token; and
    neither the hub token nor a control token appears in any ConfigMap, the jobs (spec,
    status, annotations), the training Jobs, any event, or the operator's log, even after
    a stop request made the operator read the control token."""
    from kubetune.trainer.server import ControlServer, TrainerMetrics

    hub = "hf_" + "S3cr3tHubT0ken" * 3
    api["core"].create_namespaced_secret(
        namespace, {"metadata": {"name": "hf-token"}, "stringData": {"HF_TOKEN": hub}}
    )
    op = OperatorSubprocess(
        str(dev_cluster.layout.kubeconfig), tmp_path / "operator.log", "sec-op", namespace
    )
    op.start()
    try:
        for name in ("alpha", "beta"):
            _create(
                api,
                namespace,
                _ftj(
                    name,
                    model={
                        "uri": "hf://meta-llama/Llama-2-7b-hf",
                        "secretRef": {"name": "hf-token"},
                    },
                    annotations={"kubetune.dev/sim-run-ms": "30000"},
                ),
            )
        try:
            for name in ("alpha", "beta"):
                _wait_cond(api, namespace, name, "Running", timeout=60)
        except AssertionError as exc:
            log = (tmp_path / "operator.log").read_text()[-4000:]
            raise AssertionError(f"{exc}\noperator log:\n{log}") from None
        tokens = {n: _token(api, namespace, n) for n in ("alpha", "beta")}
        assert tokens["alpha"] != tokens["beta"]
        for name in ("alpha", "beta"):
            secret = api["core"].read_namespaced_secret(f"{name}-control", namespace)
            (owner,) = secret.metadata.owner_references
            assert (owner.kind, owner.name, owner.controller) == ("FineTuneJob", name, True)
            assert owner.uid == _get(api, namespace, name)["metadata"]["uid"]
            env = (
                api["batch"]
                .read_namespaced_job(f"{name}-train", namespace)
                .spec.template.spec.containers[0]
                .env
            )
            # No secret in the environment: each is a file of a Secret volume.
            assert not [e for e in env if e.value_from and e.value_from.secret_key_ref]
            pod = api["batch"].read_namespaced_job(f"{name}-train", namespace).spec.template.spec
            mounted = {v.name: v.secret.secret_name for v in pod.volumes if v.secret}
            assert mounted == {"control-token": f"{name}-control", "hf-token": "hf-token"}
            names = {e.name for e in env}
            assert {"KUBETUNE_CONTROL_TOKEN_FILE", "HF_TOKEN_FILE"} <= names
            assert not {"KUBETUNE_CONTROL_TOKEN", "HF_TOKEN"} & names
        # Rank 0's endpoint with alpha's token: nothing, beta's, and alpha's own.
        server = ControlServer(TrainerMetrics(), tokens["alpha"], 0, host="127.0.0.1").start()
        try:
            url = f"http://127.0.0.1:{server.port}/stop"
            for header, expected in [
                ({}, 401),
                ({"Authorization": f"Bearer {tokens['beta']}"}, 401),
                ({"Authorization": f"Bearer {tokens['alpha']}x"}, 401),
                ({"Authorization": f"Bearer {tokens['alpha'][:-1]}"}, 401),
                ({"Authorization": "Bearer "}, 401),
                ({"Authorization": f"Bearer {tokens['alpha']}"}, 202),
            ]:
                req = urllib.request.Request(url, method="POST", data=b"{}", headers=header)
                try:
                    with urllib.request.urlopen(req, timeout=5) as resp:
                        code = resp.status
                except urllib.error.HTTPError as exc:
                    code = exc.code
                assert code == expected, header
        finally:
            server.close()
        # A stop request makes the operator read alpha's token and send it (to a simulated
        # pod that cannot answer): still nothing in the log.
        api["custom"].patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "alpha", {"spec": {"stopRequested": True}}
        )
        wait_for(
            lambda: (_get(api, namespace, "alpha").get("status") or {}).get("state") == "Stopping",
            30,
            "alpha to be Stopping",
        )
        time.sleep(5)  # a few resync rounds that read the token
    finally:
        op.stop()
    secrets = [hub, *tokens.values()]
    places: dict[str, str] = {"operator log": (tmp_path / "operator.log").read_text()}
    for cm in api["core"].list_namespaced_config_map(namespace).items:
        places[f"ConfigMap {cm.metadata.name}"] = json.dumps(cm.data) + json.dumps(cm.binary_data)
    for ftj in api["custom"].list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)[
        "items"
    ]:
        places[f"FineTuneJob {ftj['metadata']['name']}"] = json.dumps(ftj)
    for job in api["batch"].list_namespaced_job(namespace).items:
        places[f"Job {job.metadata.name}"] = json.dumps(
            api["core"].api_client.sanitize_for_serialization(job)
        )
    for event in api["core"].list_namespaced_event(namespace).items:
        places[f"Event {event.metadata.name}"] = f"{event.message} {event.reason}"
    assert "stop request to" in places["operator log"]  # the token was read and sent
    leaks = [where for where, text in places.items() for s in secrets if s in text]
    assert leaks == []
