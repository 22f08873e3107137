"""The dev cluster's Kueue: its Configuration, its webhooks by URL and its CRDs'
conversion webhook (pure parts; the cluster tier runs the real Kueue)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from kubetune.devcluster import kueue as kq

pytestmark = pytest.mark.unit


def _hook(name: str, path: str) -> dict[str, Any]:
    return {
        "name": name,
        "admissionReviewVersions": ["v1"],
        "clientConfig": {
            "service": {"name": "webhook-service", "namespace": "system", "path": path}
        },
        "failurePolicy": "Fail",
        "rules": [{"operations": ["CREATE"]}],
        "sideEffects": "None",
    }


def test_only_the_served_webhooks_are_registered_by_url_with_the_ca() -> None:
    docs = [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "mutating-webhook-configuration"},
            "webhooks": [
                _hook("mjob.kb.io", "/mutate-batch-v1-job"),
                _hook("mpod.kb.io", "/mutate--v1-pod"),  # the pod integration is off
                _hook("mworkload.kb.io", "/mutate-kueue-x-k8s-io-v1beta2-workload"),
                _hook("mjobset.kb.io", "/mutate-jobset-x-k8s-io-v1alpha2-jobset"),
            ],
        },
        None,
    ]
    (out,) = kq.webhook_configurations(docs, "https://127.0.0.1:4443", b"CA")
    assert out["metadata"] == {"name": "kubetune-dev-kueue-mutating-webhook-configuration"}
    assert [h["name"] for h in out["webhooks"]] == ["mjob.kb.io", "mworkload.kb.io"]
    assert out["webhooks"][0]["clientConfig"] == {
        "url": "https://127.0.0.1:4443/mutate-batch-v1-job",
        "caBundle": base64.b64encode(b"CA").decode(),
    }
    assert out["webhooks"][0]["failurePolicy"] == "Fail"


def test_conversion_goes_to_the_crds_kueues_kustomization_patches() -> None:
    kustomization = {"patches": [{"path": "patches/webhook_in_workloads.yaml"}]}
    patches = {
        "webhook_in_workloads.yaml": {
            "metadata": {"name": "workloads.kueue.x-k8s.io"},
            "spec": {"conversion": {"strategy": "Webhook"}},
        },
        "webhook_in_resourceflavors.yaml": {  # commented out in the kustomization
            "metadata": {"name": "resourceflavors.kueue.x-k8s.io"},
            "spec": {"conversion": {"strategy": "Webhook"}},
        },
    }
    names = kq.conversion_crd_names(kustomization, patches)
    assert names == {"workloads.kueue.x-k8s.io"}
    crd = {"metadata": {"name": "workloads.kueue.x-k8s.io"}, "spec": {"group": "kueue.x-k8s.io"}}
    got = kq.with_conversion(crd, names, "https://127.0.0.1:1/convert", b"CA")
    assert got["spec"]["conversion"]["webhook"]["clientConfig"]["url"].endswith("/convert")
    assert got["spec"]["group"] == "kueue.x-k8s.io"
    other = {"metadata": {"name": "cohorts.kueue.x-k8s.io"}, "spec": {}}
    assert kq.with_conversion(other, names, "u", b"") is other


def test_the_configuration_keeps_everything_on_loopback_with_our_certificates() -> None:
    cfg = kq.configuration(kq.KueuePorts(webhook=4443, health=4444, visibility=4445), Path("/c"))
    assert cfg["webhook"] == {"host": "127.0.0.1", "port": 4443, "certDir": "/c"}
    assert cfg["health"]["healthProbeBindAddress"] == "127.0.0.1:4444"
    assert cfg["metrics"]["bindAddress"] == "0"
    assert cfg["internalCertManagement"] == {"enable": False}
    assert cfg["integrations"]["frameworks"] == ["batch/job"]
    assert cfg["manageJobsWithoutQueueName"] is False
    assert cfg["waitForPodsReady"]["timeout"] == kq.PODS_READY_TIMEOUT
    assert cfg["visibilityServer"] == {"bindAddress": "127.0.0.1", "bindPort": 4445}
    args = kq.kueue_args(Path("/b/kueue"), Path("/c.yaml"), Path("/k"))
    assert not any("VisibilityOnDemand" in a for a in args)  # the visibility API is served


def test_the_visibility_api_is_proxied_to_loopback_through_an_external_name_service() -> None:
    service, api_service = kq.visibility_manifests(4445)
    assert service["spec"] == {"type": "ExternalName", "externalName": "localhost"}
    spec = api_service["spec"]
    assert api_service["metadata"]["name"] == "v1beta2.visibility.kueue.x-k8s.io"
    assert (spec["group"], spec["version"]) == ("visibility.kueue.x-k8s.io", "v1beta2")
    assert spec["service"] == {
        "name": service["metadata"]["name"],
        "namespace": service["metadata"]["namespace"],
        "port": 4445,
    }


def test_kueue_lives_next_to_its_manifests_in_the_versioned_cache(tmp_path: Path) -> None:
    dist = kq.find_kueue(tmp_path, {"KUEUE_VERSION": "v0.17.0"})
    assert dist.binary == tmp_path / "kueue-v0.17.0" / "kueue"
    assert dist.webhook_manifests == tmp_path / "kueue-v0.17.0" / "config/webhook/manifests.yaml"
    assert len(dist.missing()) == 3
