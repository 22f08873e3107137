"""Pure parts of the dev cluster: versions file, command lines, node manifests, and the
local pod runner's environment handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.devcluster import components as c
from kubetune.devcluster.binaries import (
    Binaries,
    ToolsMissingError,
    find_binaries,
    read_versions,
    require,
)
from kubetune.devcluster.pki import ClusterPKI
from kubetune.devcluster.podrunner import (
    expand,
    field_value,
    read_termination_message,
    resource_value,
)

pytestmark = pytest.mark.unit

POD = {
    "metadata": {
        "name": "job-0-abc",
        "namespace": "team-a",
        "uid": "1234",
        "labels": {"app": "x"},
        "annotations": {"batch.kubernetes.io/job-completion-index": "3"},
    },
    "spec": {"nodeName": "local-runner-0", "serviceAccountName": "trainer"},
    "status": {},
}


def test_versions_file_pins_every_tool() -> None:
    versions = read_versions()
    assert set(versions) >= {
        "ETCD_VERSION",
        "K8S_VERSION",
        "KWOK_VERSION",
        "HELM_VERSION",
        "PROMETHEUS_VERSION",
    }
    assert versions["K8S_VERSION"].startswith("v1.")


def test_malformed_versions_line_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "versions.env"
    bad.write_text("# ok\nETCD_VERSION v3\n")
    with pytest.raises(ValueError, match="malformed line 'ETCD_VERSION v3'"):
        read_versions(bad)


def test_binaries_live_in_versioned_cache_dirs(tmp_path: Path) -> None:
    bins = find_binaries(
        tmp_path,
        {
            "ETCD_VERSION": "v3.6.16",
            "K8S_VERSION": "v1.37.2",
            "KWOK_VERSION": "v0.8.0",
            "HELM_VERSION": "v3.22.0",
            "PROMETHEUS_VERSION": "v0.316.0",
            "COREDNS_VERSION": "v1.15.0",
            "CRI_TOOLS_VERSION": "v1.37.0",
        },
    )
    assert bins.kube_apiserver == tmp_path / "kubernetes-v1.37.2" / "kube-apiserver"
    assert bins.etcd == tmp_path / "etcd-v3.6.16" / "etcd"
    assert bins.promtool == tmp_path / "prometheus-v0.316.0" / "promtool"
    with pytest.raises(ToolsMissingError, match="make tools"):
        require([bins.etcd])


def _layout_and_bins(tmp_path: Path) -> tuple[c.Layout, Binaries, c.Ports]:
    bins = Binaries(
        *(
            tmp_path / n
            for n in (
                "etcd",
                "kas",
                "kcm",
                "ks",
                "kubectl",
                "kwok",
                "helm",
                "prom",
                "promtool",
                "kubelet",
                "kube-proxy",
                "coredns",
                "crictl",
            )
        )
    )
    return c.Layout(tmp_path), bins, c.Ports(2379, 2380, 6443, 10257, 10259, 10247)


def test_component_command_lines_bind_to_loopback(tmp_path: Path) -> None:
    layout, bins, ports = _layout_and_bins(tmp_path)
    etcd = c.etcd_args(bins, ports, layout)
    assert "--listen-client-urls=http://127.0.0.1:2379" in etcd
    kcm = c.controller_manager_args(bins, ports, layout, _fake_pki(tmp_path))
    controllers = next(a for a in kcm if a.startswith("--controllers=")).split("=")[1].split(",")
    for needed in (
        "job-controller",
        "garbage-collector-controller",
        "namespace-controller",
        "ttl-after-finished-controller",
        "pod-garbage-collector-controller",
        "deployment-controller",
        "replicaset-controller",
    ):
        assert needed in controllers
    for args in (kcm, c.scheduler_args(bins, ports, layout)):
        assert "--bind-address=127.0.0.1" in args
        assert "--leader-elect=false" in args
    kas = c.apiserver_args(bins, ports, layout, _fake_pki(tmp_path))
    assert "--authorization-mode=RBAC" in kas
    assert "--bind-address=127.0.0.1" in kas
    assert any(a.startswith("--service-account-signing-key-file=") for a in kas)
    kwok = c.kwok_args(bins, ports, layout)
    assert f"--manage-nodes-with-label-selector={c.NODE_KIND_LABEL}=kwok" in kwok
    # The aggregation layer (Kueue's visibility API): the front proxy's own CA and name.
    pki = _fake_pki(tmp_path)
    assert f"--requestheader-client-ca-file={pki.front_proxy_ca.cert}" in kas
    assert "--requestheader-allowed-names=front-proxy-client" in kas
    assert f"--proxy-client-cert-file={pki.front_proxy_client.cert}" in kas


def test_the_front_proxy_has_a_ca_of_its_own(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from kubetune.devcluster.cluster import generate_pki_paths
    from kubetune.devcluster.pki import FRONT_PROXY_CLIENT, generate_pki

    made = generate_pki(tmp_path)
    assert generate_pki_paths(tmp_path) == made

    def load(path: Path) -> x509.Certificate:
        return x509.load_pem_x509_certificate(path.read_bytes())

    ca, fp_ca, fp_client = (
        load(made.ca.cert),
        load(made.front_proxy_ca.cert),
        load(made.front_proxy_client.cert),
    )
    assert fp_ca.subject != ca.subject
    assert fp_client.issuer == fp_ca.subject
    cn = fp_client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == FRONT_PROXY_CLIENT
    fp_client.verify_directly_issued_by(fp_ca)


def _fake_pki(tmp_path: Path) -> ClusterPKI:
    from kubetune.devcluster.cluster import generate_pki_paths

    return generate_pki_paths(tmp_path / "pki")


def test_gpu_nodes_carry_capacity_and_gpu_feature_labels() -> None:
    nodes = c.gpu_node_manifests(
        c.GpuNodePool(count=3, gpus_per_node=4, product="NVIDIA-A100", gpu_memory_mib=40960)
    )
    assert [n["metadata"]["name"] for n in nodes] == ["gpu-node-0", "gpu-node-1", "gpu-node-2"]
    for node in nodes:
        assert node["status"]["capacity"]["nvidia.com/gpu"] == "4"
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "4"
        labels = node["metadata"]["labels"]
        assert labels["nvidia.com/gpu.product"] == "NVIDIA-A100"
        assert labels["nvidia.com/gpu.memory"] == "40960"
        assert labels[c.NODE_KIND_LABEL] == "kwok"


def test_local_runner_node_is_tainted_and_placement_tolerates_it() -> None:
    node = c.local_runner_node_manifest("local-runner-0")
    (taint,) = node["spec"]["taints"]
    placement = c.local_runner_pod_placement("local-runner-0")
    (tol,) = placement["tolerations"]
    assert (tol["key"], tol["value"], tol["effect"]) == (
        taint["key"],
        taint["value"],
        taint["effect"],
    )
    assert placement["nodeSelector"] == {"kubernetes.io/hostname": "local-runner-0"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("$(A)-$(B)", "1-2"),
        ("$$(A)", "$(A)"),
        ("$(MISSING)", "$(MISSING)"),
        ("plain", "plain"),
        ("$(A)$(A)", "11"),
    ],
)
def test_dollar_expansion_follows_kubernetes_rules(value: str, expected: str) -> None:
    assert expand(value, {"A": "1", "B": "2"}) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("metadata.name", "job-0-abc"),
        ("metadata.namespace", "team-a"),
        ("metadata.uid", "1234"),
        ("metadata.labels['app']", "x"),
        ("metadata.annotations['batch.kubernetes.io/job-completion-index']", "3"),
        ("spec.nodeName", "local-runner-0"),
        ("spec.serviceAccountName", "trainer"),
        ("status.podIP", "127.0.0.1"),
    ],
)
def test_downward_api_fields(path: str, expected: str) -> None:
    assert field_value(POD, path) == expected


def test_unknown_downward_api_field_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported fieldRef"):
        field_value(POD, "spec.bogus")


def test_resource_field_ref_rounds_cpu_up() -> None:
    container = {"resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}}}
    assert resource_value(container, "limits.cpu", None) == "2"
    assert resource_value(container, "limits.cpu", "1m") == "1500"
    assert resource_value(container, "limits.memory", None) == "1Gi"


def test_termination_message_file_then_log_fallback(tmp_path: Path) -> None:
    term, logf = tmp_path / "term", tmp_path / "log"
    term.write_text("")
    logf.write_text("\n".join(f"line {i}" for i in range(200)))
    assert read_termination_message(term, logf, "File", 1) == ""
    fallback = read_termination_message(term, logf, "FallbackToLogsOnError", 1)
    assert fallback.endswith("line 199")
    assert "line 119" not in fallback
    assert read_termination_message(term, logf, "FallbackToLogsOnError", 0) == ""
    term.write_text("x" * 10000)
    assert len(read_termination_message(term, logf, "File", 0)) == 4096


def test_free_ports_avoid_the_ephemeral_range() -> None:
    from kubetune.devcluster.cluster import _ephemeral_range, free_port

    low, high = _ephemeral_range()
    for _ in range(50):
        port = free_port()
        assert not low <= port <= high
        assert 1024 < port <= 65535
