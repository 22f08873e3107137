"""Cluster-tier fixtures shared by the API and operator tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.waiting import wait_for

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "kubetune.dev_finetunejobs.yaml"


def _established(ext: Any, name: str) -> bool:
    crd = ext.read_custom_resource_definition(name)
    conditions = (crd.status.conditions if crd.status else None) or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


def install_crd(api_client: Any, path: Path = CRD_FILE) -> str:
    """Create the CRD in `path`, or replace the one there; wait until it is Established."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    body = yaml.safe_load(path.read_text())
    name = str(body["metadata"]["name"])
    ext = client.ApiextensionsV1Api(api_client)
    try:
        ext.create_custom_resource_definition(body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        current = ext.read_custom_resource_definition(name)
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        ext.replace_custom_resource_definition(name, body)
    wait_for(lambda: _established(ext, name), 30, f"CRD {name} to be Established")
    return name


@pytest.fixture(scope="session")
def crd_installed(api_client: Any) -> str:
    """The FineTuneJob CRD from crds/, installed (or replaced) and Established; its name.

    Established means the API server serves the resource; the discovery cache of a client
    such as kubectl may still lag a moment behind.
    """
    return install_crd(api_client)


@pytest.fixture
def api(api_client: Any) -> dict[str, Any]:
    """Typed clients by group, for the cluster tests."""
    from kubernetes import client

    return {
        "core": client.CoreV1Api(api_client),
        "batch": client.BatchV1Api(api_client),
        "custom": client.CustomObjectsApi(api_client),
    }
