"""Checkov (a manifest scanner cluster admins run) on the training Job and the prepare Job the
builders make for `numNodes: 2, gpusPerNode: 8` with no resourcesPerNode, and on the chart
rendered for one job namespace: the checks issue 16 fixed pass, and what still fails is
exactly the findings docs/reliability.md ("Manifest scanner") calls deliberate.

Checkov lives in its own virtual environment (tools/checkov.sh); without it this skips."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.devcluster.binaries import find_binaries
from kubetune.operator import builders as b
from kubetune.operator.builders import JobRef
from kubetune.operator.settings import OperatorSettings
from tests.plans import plan_document
from tests.unit.specs import spec_from

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHECKOV = (
    Path(os.environ.get("KUBETUNE_CHECKOV_VENV", Path.home() / ".cache/kubetune/checkov-venv"))
    / "bin"
    / "checkov"
)
REF = JobRef(name="demo", namespace="team-a", uid="0f1e2d3c-uid", generation=1)

#: Fixed by issue 16 on both Jobs: CPU request, memory request, memory limit, no `latest`
#: tag, secrets as files, a read-only root filesystem; and (scanned with the chart) a
#: NetworkPolicy selecting the training pods.
FIXED = {"CKV_K8S_10", "CKV_K8S_12", "CKV_K8S_13", "CKV_K8S_14", "CKV_K8S_35", "CKV_K8S_22"}
#: Deliberate (docs/reliability.md): no CPU limit, a tag rather than a digest, pull policy
#: IfNotPresent, UID 1000 (the image's user, not a "high" UID).
DELIBERATE_POD = {"CKV_K8S_11", "CKV_K8S_43", "CKV_K8S_15", "CKV_K8S_40"}
EXPECTED_FAILURES = {
    *((check, "Job.team-a.demo-train") for check in DELIBERATE_POD),
    *((check, "Job.team-a.demo-prepare") for check in DELIBERATE_POD),
    # The operator: no CPU limit, tag, IfNotPresent (as above); its service account token
    # is mounted because it calls the API; it has no NetworkPolicy of its own; it reads the
    # control Secrets of the job namespaces.
    ("CKV_K8S_11", "Deployment.kubetune-system.rel-kubetune"),
    ("CKV_K8S_43", "Deployment.kubetune-system.rel-kubetune"),
    ("CKV_K8S_15", "Deployment.kubetune-system.rel-kubetune"),
    ("CKV_K8S_38", "Deployment.kubetune-system.rel-kubetune"),
    ("CKV2_K8S_6", "operator-pod"),
    ("CKV2_K8S_5", "RoleBinding.team-a.rel-kubetune-job-secrets"),
}


def _manifests(directory: Path) -> None:
    spec = spec_from(
        {
            "model": {"uri": "hf://Qwen/Qwen2-0.5B", "secretRef": {"name": "hf-token"}},
            "dataset": {"uri": "s3://data/train.jsonl"},
            "output": {"uri": "pvc://out/run"},
        },
        REF.name,
        REF.namespace,
        resources={"numNodes": 2, "gpusPerNode": 8},
        storage={"s3": {"credentialsSecret": "s3-creds"}},
    )
    settings = OperatorSettings()
    jobs = [
        b.training_job(REF, spec, plan_document(), settings),
        b.prepare_job(REF, spec, settings, 80.0),
    ]
    (directory / "jobs.yaml").write_text(yaml.safe_dump_all(jobs))
    chart = subprocess.run(
        [
            str(find_binaries().helm),
            "template",
            "rel",
            str(ROOT / "charts/kubetune"),
            "--namespace",
            "kubetune-system",
            "--set",
            "rbac.jobNamespaces={team-a}",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    (directory / "chart.yaml").write_text(chart)


def _scan(directory: Path) -> dict[str, Any]:
    result = subprocess.run(
        [
            str(CHECKOV),
            "-d",
            str(directory),
            "--framework",
            "kubernetes",
            "-o",
            "json",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode in (0, 1), result.stderr[-2000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _resource(name: str) -> str:
    return "operator-pod" if name.startswith("Pod.kubetune-system.rel-kubetune.") else name


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not CHECKOV.exists():
        pytest.skip(f"checkov is not installed at {CHECKOV}: run tools/checkov.sh")
    directory = tmp_path_factory.mktemp("checkov")
    _manifests(directory)
    return _scan(directory)


def test_the_fixed_checks_pass_on_both_jobs(report: dict[str, Any]) -> None:
    passed = {(c["check_id"], c["resource"]) for c in report["results"]["passed_checks"]}
    for job in ("Job.team-a.demo-train", "Job.team-a.demo-prepare"):
        missing = {check for check in FIXED if (check, job) not in passed}
        assert not missing, f"{job}: {sorted(missing)} do not pass"
    failed = {c["check_id"] + " " + c["resource"] for c in report["results"]["failed_checks"]}
    assert not [f for f in failed if f.startswith("CKV2_K8S_6 Pod.team-a.")]


def test_what_still_fails_is_exactly_the_deliberate_findings(report: dict[str, Any]) -> None:
    failed = {(c["check_id"], _resource(c["resource"])) for c in report["results"]["failed_checks"]}
    assert failed == EXPECTED_FAILURES
