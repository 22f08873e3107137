"""Shared fixtures. The cluster tier starts one real local control plane per test session
(etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok + the local pod
runner) the first time a test asks for it, and stops it when the session ends."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.waiting import wait_for


def _has_default_sa(core: Any, ns: str) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        core.read_namespaced_service_account("default", ns)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


@pytest.fixture(scope="session")
def dev_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from kubetune.devcluster.cluster import DevCluster

    root = Path(os.environ.get("KUBETUNE_TEST_CLUSTER_DIR") or tmp_path_factory.mktemp("cluster"))
    cluster = DevCluster(root, tie_to_parent=True)
    cluster.start(timeout=180)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def api_client(dev_cluster: Any) -> Any:
    return dev_cluster.api_client()


@pytest.fixture
def namespace(api_client: Any) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting)."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    # Pods are refused until the service-account controller has made the default account.
    wait_for(lambda: _has_default_sa(core, name), 30, f"default service account in {name}")
    try:
        yield name
    finally:
        core.delete_namespace(name)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3-compatible server (SeaweedFS, `tools/build.sh seaweedfs`) on 127.0.0.1."""
    from kubetune.devcluster.s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def _s3_session_bucket(s3_server: Any) -> str:
    from pyarrow.fs import S3FileSystem

    name = f"kt-{uuid.uuid4().hex[:10]}"
    fs = S3FileSystem(
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        endpoint_override=s3_server.endpoint_url.removeprefix("http://"),
        scheme="http",
        region="us-east-1",
        allow_bucket_creation=True,
    )
    wait_for(lambda: _created(fs, name), 60, f"bucket {name}")
    return name


@pytest.fixture
def s3_bucket(_s3_session_bucket: str) -> str:
    """A fresh place on the server: `bucket/prefix`, to be used as `s3://{s3_bucket}/key`
    (one bucket per session: SeaweedFS gives each bucket its own volumes)."""
    return f"{_s3_session_bucket}/t-{uuid.uuid4().hex[:8]}"


def _created(fs: Any, bucket: str) -> bool:
    try:
        fs.create_dir(bucket)
    except OSError:
        return False
    return True
