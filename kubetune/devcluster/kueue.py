"""Kueue for the dev cluster: its controller-manager on 127.0.0.1 with the cluster's PKI,
its CRDs, and its webhooks registered with the API server by URL.

`make tools` builds the binary from the `sigs.k8s.io/kueue` Go module and copies the
module's `config/components/{crd,webhook}` next to it (tools/build.sh), so the CRDs and
webhooks always match the binary. The pure parts (the Configuration file, the webhook and
CRD manifests rewritten for a loopback URL) are functions here; `DevCluster.start_kueue`
does the I/O.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetune.contract import KUEUE_VISIBILITY_GROUP, KUEUE_VISIBILITY_VERSION
from kubetune.devcluster.binaries import read_versions, tools_dir

#: The namespace Kueue's Configuration names (it keeps nothing there in this setup).
KUEUE_NAMESPACE = "kueue-system"
#: The job integrations the dev cluster's Kueue manages: the training Job is a batch/v1 Job.
FRAMEWORKS = ("batch/job",)
#: How long waitForPodsReady gives an admitted Job's pods to be ready before Kueue evicts
#: and requeues it (all of a multi-node Job's pods or none).
PODS_READY_TIMEOUT = "10m"


@dataclass(frozen=True)
class KueueDist:
    """The built binary and the manifests copied from the same module source."""

    binary: Path
    config: Path

    @property
    def crd_dir(self) -> Path:
        return self.config / "crd"

    @property
    def webhook_manifests(self) -> Path:
        return self.config / "webhook" / "manifests.yaml"

    def missing(self) -> list[Path]:
        out = [] if os.access(self.binary, os.X_OK) else [self.binary]
        return out + [p for p in (self.crd_dir, self.webhook_manifests) if not p.exists()]


def find_kueue(root: Path | None = None, versions: dict[str, str] | None = None) -> KueueDist:
    """Where `make tools` put Kueue (KUBETUNE_BIN_KUEUE overrides the binary's path)."""
    v = versions or read_versions()
    base = (root or tools_dir()) / f"kueue-{v['KUEUE_VERSION']}"
    override = os.environ.get("KUBETUNE_BIN_KUEUE")
    return KueueDist(binary=Path(override) if override else base / "kueue", config=base / "config")


#: Kueue (v0.17) reads its metrics server's certificate from this fixed path whenever its
#: internal certificate management is off, even with metrics disabled (bindAddress "0").
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")


#: Kueue's visibility API server reads its serving certificate from this fixed path when
#: its internal certificate management is off (pkg/visibility/server.go). The API server
#: does not verify it (the APIService says insecureSkipTLSVerify, as Kueue's own does).
VISIBILITY_CERT_DIR = Path("/visibility")
#: The Service the visibility APIService (kubetune.contract.KUEUE_VISIBILITY_*) points at.
VISIBILITY_SERVICE = "kubetune-dev-kueue-visibility"


@dataclass(frozen=True)
class KueuePorts:
    webhook: int
    health: int
    visibility: int


def configuration(ports: KueuePorts, cert_dir: Path) -> dict[str, Any]:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2): everything on 127.0.0.1, no
    leader election, certificates from the dev cluster's CA instead of Kueue's own, only the
    batch/v1 Job integration, Jobs without a queue label left alone, and waitForPodsReady."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports.health}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": ports.webhook, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "waitForPodsReady": {
            "timeout": PODS_READY_TIMEOUT,
            "blockAdmission": False,
            "requeuingStrategy": {"timestamp": "Eviction"},
        },
        "integrations": {"frameworks": list(FRAMEWORKS)},
        # The visibility API (pending workloads and their positions), an aggregated API
        # server: on loopback, reached by the API server through `visibility_manifests`.
        "visibilityServer": {"bindAddress": "127.0.0.1", "bindPort": ports.visibility},
    }


def kueue_args(binary: Path, config_file: Path, kubeconfig: Path) -> list[str]:
    return [
        str(binary),
        f"--config={config_file}",
        f"--kubeconfig={kubeconfig}",
        "--zap-log-level=info",
    ]


def visibility_manifests(port: int) -> list[dict[str, Any]]:
    """The Service and APIService that make the API server proxy
    /apis/visibility.kueue.x-k8s.io/v1beta2 to Kueue's visibility server on 127.0.0.1:`port`.

    The Service is an ExternalName one naming `localhost`: the aggregator (without
    --enable-aggregator-routing) dials an ExternalName service's name at the APIService's
    port, while a ClusterIP service would need a route to its cluster IP and an Endpoints
    object cannot hold a loopback address."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": VISIBILITY_SERVICE, "namespace": KUEUE_NAMESPACE},
        "spec": {"type": "ExternalName", "externalName": "localhost"},
    }
    api_service = {
        "apiVersion": "apiregistration.k8s.io/v1",
        "kind": "APIService",
        "metadata": {"name": f"{KUEUE_VISIBILITY_VERSION}.{KUEUE_VISIBILITY_GROUP}"},
        "spec": {
            "group": KUEUE_VISIBILITY_GROUP,
            "version": KUEUE_VISIBILITY_VERSION,
            "groupPriorityMinimum": 100,
            "versionPriority": 100,
            "insecureSkipTLSVerify": True,
            "service": {"name": VISIBILITY_SERVICE, "namespace": KUEUE_NAMESPACE, "port": port},
        },
    }
    return [service, api_service]


def _served(path: str) -> bool:
    """Whether this Kueue serves a webhook path: its own kinds and the batch/v1 Job (the
    integrations not enabled register no handler, and a webhook without one would refuse
    every object it matches)."""
    return "-kueue-x-k8s-io-" in path or path.endswith("-batch-v1-job")


def webhook_configurations(
    manifests: Iterable[dict[str, Any] | None], base_url: str, ca_bundle: bytes
) -> list[dict[str, Any]]:
    """Kueue's Mutating/ValidatingWebhookConfigurations with each service reference
    replaced by `base_url` + its path and the CA bundle; only the webhooks Kueue serves here."""
    out = []
    ca = base64.b64encode(ca_bundle).decode()
    for doc in manifests:
        if not doc or doc.get("kind") not in (
            "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration",
        ):
            continue
        hooks = []
        for hook in doc.get("webhooks") or []:
            path = str(((hook.get("clientConfig") or {}).get("service") or {}).get("path") or "")
            if not _served(path):
                continue
            hooks.append({**hook, "clientConfig": {"url": base_url + path, "caBundle": ca}})
        name = "kubetune-dev-kueue-" + str(doc["metadata"]["name"])
        out.append({**doc, "metadata": {"name": name}, "webhooks": hooks})
    return out


def conversion_crd_names(kustomization: dict[str, Any], patches: dict[str, Any]) -> set[str]:
    """The CRDs Kueue's kustomization gives a conversion webhook (`patches` by file name)."""
    names = set()
    for entry in kustomization.get("patches") or []:
        patch = patches.get(Path(str(entry.get("path", ""))).name) if entry else None
        if patch and ((patch.get("spec") or {}).get("conversion") or {}).get("strategy"):
            names.add(str(patch["metadata"]["name"]))
    return names


def with_conversion(
    crd: dict[str, Any], convert: set[str], url: str, ca_bundle: bytes
) -> dict[str, Any]:
    """The CRD with its conversion webhook at `url` when Kueue converts it."""
    if crd["metadata"]["name"] not in convert:
        return crd
    spec = {
        **crd["spec"],
        "conversion": {
            "strategy": "Webhook",
            "webhook": {
                "clientConfig": {"url": url, "caBundle": base64.b64encode(ca_bundle).decode()},
                "conversionReviewVersions": ["v1"],
            },
        },
    }
    return {**crd, "spec": spec}


def crd_manifests(dist: KueueDist, base_url: str, ca_bundle: bytes) -> list[dict[str, Any]]:
    """Kueue's CRDs as its kustomization would install them, conversion at `base_url`."""
    kustomization = yaml.safe_load((dist.crd_dir / "kustomization.yaml").read_text()) or {}
    patches = {
        p.name: yaml.safe_load(p.read_text()) for p in (dist.crd_dir / "patches").glob("*.yaml")
    }
    convert = conversion_crd_names(kustomization, patches)
    return [
        with_conversion(yaml.safe_load(p.read_text()), convert, base_url + "/convert", ca_bundle)
        for p in sorted((dist.crd_dir / "bases").glob("*.yaml"))
    ]


def webhook_manifests(dist: KueueDist, base_url: str, ca_bundle: bytes) -> list[dict[str, Any]]:
    docs = list(yaml.safe_load_all(dist.webhook_manifests.read_text()))
    return webhook_configurations(docs, base_url, ca_bundle)
