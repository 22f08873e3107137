"""The reconciler against an in-memory API (`FakeKube`, which implements
`kubetune.operator.kubeapi.KubeApi`): whole reconciles of a job from planning to its end, and
the training and plan phases' handling of pods the API server refuses."""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import FineTuneJobSpec
from kubetune.contract import SUSPEND_ANNOTATION, encode_prepare_message
from kubetune.operator import builders as b
from kubetune.operator.k8s import ChildConflictError
from kubetune.operator.reconcile import InputMissingError, Reconciler, StatusDraft
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.status import get_condition, state_of
from tests.plans import plan_document
from tests.unit.specs import spec_from
from tests.unit.test_operator_status import PSS_REFUSAL, cond

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class FakeKube:
    """The Kubernetes API as the reconciler uses it, in memory: FineTuneJobs, children by
    kind, namespace and name (checked for their owner as the API server and `Kube.ensure`
    do), ConfigMap keys, and what the tests set for pods: rank 0's address and termination
    message, and refusals by Job name. Records the status patches, suspend changes and
    deletions."""

    def __init__(self) -> None:
        self.ftjs: dict[tuple[str, str], dict[str, Any]] = {}
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.config_maps: dict[tuple[str, str], dict[str, str | bytes]] = {}
        self.terminations: dict[tuple[str, str], str] = {}
        self.pod_ips: dict[tuple[str, str], str] = {}
        #: Pods by (namespace, Job name), as the API returns them (camelCase dicts).
        self.pods: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.deleted_jobs: list[tuple[str, str]] = []
        self.refusals: dict[tuple[str, str], str] = {}
        self.nodes: list[dict[str, Any]] | None = []
        self.created: list[tuple[str, str]] = []
        self.patches: list[dict[str, Any]] = []
        self.suspends: list[tuple[str, bool, str]] = []
        self.deleted: list[tuple[str, str]] = []
        #: Kueue: Workloads by (namespace, Job uid); None: the API does not serve them.
        self.workloads: dict[tuple[str, str], list[dict[str, Any]]] | None = {}
        self.local_queues: dict[tuple[str, str], dict[str, Any]] = {}
        #: Kueue's visibility API by LocalQueue; None: not served.
        self.pending: dict[tuple[str, str], list[dict[str, Any]]] | None = None
        self.pending_reads = 0
        self.activations: list[tuple[str, bool, str]] = []

    # ---- the FineTuneJob
    def add_ftj(self, manifest: dict[str, Any], uid: str = "uid-1") -> dict[str, Any]:
        ftj = copy.deepcopy(manifest)
        meta = ftj["metadata"]
        meta.setdefault("namespace", "ns")
        meta.setdefault("uid", uid)
        meta.setdefault("generation", 1)
        self.ftjs[(meta["namespace"], meta["name"])] = ftj
        return ftj

    def get_ftj(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.ftjs.get((namespace, name)))

    def patch_ftj_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        if (namespace, name) not in self.ftjs:
            raise LookupError(f"{namespace}/{name} is gone (404)")
        self.patches.append(copy.deepcopy(status))
        self.ftjs[(namespace, name)]["status"] = copy.deepcopy(status)

    def delete_ftj(self, namespace: str, name: str) -> None:
        self.deleted.append((namespace, name))
        self.ftjs.pop((namespace, name), None)

    # ---- its children
    def ensure(self, manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        meta = manifest["metadata"]
        key = (manifest["kind"], meta["namespace"], meta["name"])
        existing = self.objects.get(key)
        if existing is None:
            manifest = copy.deepcopy(manifest)
            manifest["metadata"].setdefault("uid", f"uid-{meta['name']}")
            self.objects[key] = copy.deepcopy(manifest)
            self.created.append((manifest["kind"], meta["name"]))
            return copy.deepcopy(manifest), True
        want = {o["uid"] for o in meta.get("ownerReferences", [])}
        have = {o.get("uid") for o in existing["metadata"].get("ownerReferences") or []}
        if want and not want & have:
            raise ChildConflictError(f"{key} already exists and is not owned by this job")
        return copy.deepcopy(existing), False

    def stored_job(self, namespace: str, name: str) -> dict[str, Any]:
        """The stored Job itself, for a test to give it a status."""
        return self.objects[("Job", namespace, name)]

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get(("Job", namespace, name)))

    def set_job_suspend(self, namespace: str, name: str, suspend: bool, applied: str) -> None:
        self.suspends.append((name, suspend, applied))
        job = self.stored_job(namespace, name)
        job["spec"]["suspend"] = suspend
        job["metadata"].setdefault("annotations", {})[SUSPEND_ANNOTATION] = applied

    def job_workloads(self, namespace: str, job_uid: str) -> list[dict[str, Any]] | None:
        if self.workloads is None:
            return None
        return copy.deepcopy(self.workloads.get((namespace, job_uid), []))

    def get_local_queue(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.local_queues.get((namespace, name)))

    def pending_workloads(self, namespace: str, queue: str) -> list[dict[str, Any]] | None:
        self.pending_reads += 1
        if self.pending is None:
            return None
        return copy.deepcopy(self.pending.get((namespace, queue), []))

    def set_workload_active(
        self, namespace: str, name: str, active: bool, job: str, applied: str
    ) -> None:
        self.activations.append((name, active, applied))
        stored = self.stored_job(namespace, job)
        stored["metadata"].setdefault("annotations", {})[SUSPEND_ANNOTATION] = applied

    def termination_message(
        self, namespace: str, job_name: str, index: str | None = "0"
    ) -> str | None:
        return self.terminations.get((namespace, job_name))

    def pod_creation_failure(self, namespace: str, job: dict[str, Any]) -> str | None:
        return self.refusals.get((namespace, job["metadata"]["name"]))

    def pod0_ip(self, namespace: str, job_name: str) -> str | None:
        return self.pod_ips.get((namespace, job_name))

    def job_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        return copy.deepcopy(self.pods.get((namespace, job_name), []))

    def delete_job(self, namespace: str, name: str) -> None:
        self.deleted_jobs.append((namespace, name))
        self.objects.pop(("Job", namespace, name), None)

    def read_secret_key(self, namespace: str, name: str, key: str) -> str | None:
        secret = self.objects.get(("Secret", namespace, name))
        if secret is None:
            return None
        value = (secret.get("stringData") or {}).get(key)
        return None if value is None else str(value)

    # ---- the inputs of a plan
    def config_map_key(self, namespace: str, name: str, key: str) -> str | bytes | None:
        return self.config_maps.get((namespace, name), {}).get(key)

    def list_nodes(self) -> list[dict[str, Any]] | None:
        return self.nodes


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def __call__(self, body: dict[str, Any], etype: str, reason: str, message: str) -> None:
        assert body["kind"] == "FineTuneJob"
        self.seen.append((etype, reason, message))

    def reasons(self) -> list[str]:
        return [reason for _, reason, _ in self.seen]


def configmap_example(kube: FakeKube, **spec: Any) -> dict[str, Any]:
    """examples/configmap-dataset.yaml in namespace ns: its ConfigMap and its job (with
    `spec` merged in)."""
    config_map, job = yaml.safe_load_all((EXAMPLES / "configmap-dataset.yaml").read_text())
    kube.config_maps[("ns", config_map["metadata"]["name"])] = dict(config_map["data"])
    job["spec"].update(spec)
    return kube.add_ftj(job)


def training_children(name: str) -> list[tuple[str, str]]:
    """What the training phase creates, in its order: the training Job last."""
    return [
        ("ConfigMap", f"{name}-config"),
        ("Secret", f"{name}-control"),
        ("Service", f"{name}-train"),
        ("Job", f"{name}-train"),
    ]


def reconciler(kube: FakeKube) -> tuple[Reconciler, Events]:
    events = Events()
    return Reconciler(kube, OperatorSettings(), events=events), events


def test_a_configmap_job_is_planned_in_process_and_its_children_created_once() -> None:
    kube = FakeKube()
    ftj = configmap_example(kube)
    name = ftj["metadata"]["name"]
    rec, events = reconciler(kube)
    assert rec.reconcile("ns", name) == "training"
    assert kube.created == training_children(name)
    status = kube.ftjs[("ns", name)]["status"]
    assert status["plan"]["fits"] is True
    assert status["trainingJobName"] == f"{name}-train"
    assert status["observedGeneration"] == 1
    assert status["state"] == rec.states[("ns", name)] == "Planned"
    planned = get_condition(status["conditions"], "Planned")
    assert planned is not None
    assert (planned["status"], planned["reason"]) == ("True", "PlanReady")
    assert planned["message"].startswith(f"{status['plan']['method']} with ZeRO-")
    assert events.reasons() == ["PlanReady", "Created"]
    plan_json = kube.objects[("ConfigMap", "ns", f"{name}-config")]["data"]["plan.json"]
    assert json.loads(plan_json) == status["plan"]
    # The next reconcile reads the training Job and finds nothing new to write.
    assert rec.reconcile("ns", name) == "training"
    assert len(kube.created) == 4
    assert len(kube.patches) == 1
    assert len(events.seen) == 2


def test_a_new_jobs_first_reconcile_reads_no_job_and_lists_no_events() -> None:
    """At scale every request counts: the status names no training Job yet, so there is
    none to read; the Job just created has had no pod refused yet."""

    class Counting(FakeKube):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
            self.calls.append("get_job")
            return super().get_job(namespace, name)

        def pod_creation_failure(self, namespace: str, job: dict[str, Any]) -> str | None:
            self.calls.append("pod_creation_failure")
            return super().pod_creation_failure(namespace, job)

    kube = Counting()
    name = configmap_example(kube)["metadata"]["name"]
    rec, _ = reconciler(kube)
    assert rec.reconcile("ns", name) == "training"
    assert kube.calls == []
    assert len(kube.created) == 4
    # Once the status names it, the next reconcile reads it (and, the Job being new, still
    # asks for no Events: FRESH_JOB_SECONDS).
    kube.stored_job("ns", f"{name}-train")["metadata"]["creationTimestamp"] = st_now()
    rec.reconcile("ns", name)
    assert kube.calls == ["get_job"]
    kube.stored_job("ns", f"{name}-train")["metadata"]["creationTimestamp"] = "2024-05-06T07:08:09Z"
    rec.reconcile("ns", name)
    assert kube.calls == ["get_job", "get_job", "pod_creation_failure"]


def test_the_creating_events_body_stands_in_for_a_read_until_the_status_is_written() -> None:
    class Counting(FakeKube):
        reads = 0

        def get_ftj(self, namespace: str, name: str) -> dict[str, Any] | None:
            self.reads += 1
            return super().get_ftj(namespace, name)

    kube = Counting()
    body = copy.deepcopy(configmap_example(kube))
    name = body["metadata"]["name"]
    rec, events = reconciler(kube)
    assert rec.reconcile("ns", name, body) == "training"
    assert kube.reads == 0
    assert events.reasons() == ["PlanReady", "Created"]
    # The same body again (an event delivered late, a Kopf retry) is older than the status
    # written since: the job is read, and nothing is planned or announced twice.
    assert rec.reconcile("ns", name, body) == "training"
    assert kube.reads == 1
    assert events.reasons() == ["PlanReady", "Created"]
    assert len(kube.created) == 4


def st_now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_created_within_reads_the_api_time_and_treats_none_as_old() -> None:
    import datetime as dt

    from kubetune.operator.status import created_within

    t0 = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    obj = {"metadata": {"creationTimestamp": "2024-05-06T07:08:09Z"}}
    assert created_within(obj, 5, lambda: t0 + dt.timedelta(seconds=4))
    assert not created_within(obj, 5, lambda: t0 + dt.timedelta(seconds=6))
    assert created_within(obj, 5, lambda: t0 - dt.timedelta(seconds=60))  # a skewed clock
    assert not created_within({}, 5)
    assert not created_within({"metadata": {"creationTimestamp": "yesterday"}}, 5)


def test_a_running_job_then_its_completion_with_the_final_report() -> None:
    kube = FakeKube()
    ftj = configmap_example(kube)
    name = ftj["metadata"]["name"]
    rec, events = reconciler(kube)
    rec.reconcile("ns", name)
    kube.stored_job("ns", f"{name}-train")["status"] = {
        "active": 1,
        "ready": 1,
        "startTime": "2024-05-06T07:08:09Z",
    }
    assert rec.reconcile("ns", name) == "training"
    status = kube.ftjs[("ns", name)]["status"]
    assert status["state"] == "Running"
    assert status["startTime"] == "2024-05-06T07:08:09Z"
    kube.stored_job("ns", f"{name}-train")["status"] = {
        "succeeded": 1,
        "startTime": "2024-05-06T07:08:09Z",
        "completionTime": "2024-05-06T08:00:00Z",
        "conditions": [{"type": "Complete", "status": "True"}],
    }
    kube.terminations[("ns", f"{name}-train")] = json.dumps(
        {"metrics": {"evalLoss": 1.25}, "progress": {"step": 40, "totalSteps": 40}}
    )
    assert rec.reconcile("ns", name) == "finished"
    status = kube.ftjs[("ns", name)]["status"]
    assert status["state"] == "Succeeded"
    assert status["completionTime"] == "2024-05-06T08:00:00Z"
    assert status["metrics"] == {"evalLoss": 1.25}
    assert status["progress"] == {"step": 40, "totalSteps": 40}
    assert events.reasons()[-1] == "Completed"
    # Finished: it stays as it is.
    patches = len(kube.patches)
    assert rec.reconcile("ns", name) == "finished"
    assert len(kube.patches) == patches


def test_a_finished_job_past_its_ttl_is_deleted() -> None:
    kube = FakeKube()
    ftj = configmap_example(kube, ttlSecondsAfterFinished=60)
    name = ftj["metadata"]["name"]
    done = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=61)).strftime("%Y-%m-%dT%H:%M:%SZ")
    ftj = kube.ftjs[("ns", name)]
    ftj["status"] = {
        "conditions": [cond("Succeeded")],
        "completionTime": done,
        "state": "Succeeded",
        "observedGeneration": 1,
    }
    rec, _ = reconciler(kube)
    assert rec.reconcile("ns", name) == "expired"
    assert kube.deleted == [("ns", name)]
    assert rec.reconcile("ns", name) == "gone"
    assert ("ns", name) not in rec.states


def test_plan_only_succeeds_without_children() -> None:
    kube = FakeKube()
    name = configmap_example(kube, planOnly=True)["metadata"]["name"]
    rec, events = reconciler(kube)
    assert rec.reconcile("ns", name) == "planned"
    assert kube.created == []
    status = kube.ftjs[("ns", name)]["status"]
    assert status["state"] == "Succeeded"
    assert "completionTime" in status
    assert events.reasons() == ["PlanReady", "PlanOnly"]


def test_a_missing_configmap_is_waited_for_with_one_warning() -> None:
    kube = FakeKube()
    name = configmap_example(kube)["metadata"]["name"]
    kube.config_maps.clear()
    rec, events = reconciler(kube)
    assert rec.reconcile("ns", name) == "planning"
    assert rec.reconcile("ns", name) == "planning"
    planned = get_condition(kube.ftjs[("ns", name)]["status"]["conditions"], "Planned")
    assert planned is not None
    assert (planned["status"], planned["reason"]) == ("False", "InputNotFound")
    assert "ConfigMap ns/support-faq has no key 'train.jsonl'" in planned["message"]
    assert events.reasons() == ["InputNotFound"]
    assert kube.created == []


def test_data_on_a_claim_is_planned_by_the_prepare_job() -> None:
    kube = FakeKube()
    ftj = kube.add_ftj(
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "j"},
            "spec": {"model": {"uri": "hf://gpt2"}, "dataset": {"uri": "pvc://d/t.jsonl"}},
        }
    )
    rec, events = reconciler(kube)
    assert rec.reconcile("ns", "j") == "planning"
    assert kube.created == [("Job", "j-prepare")]
    assert events.reasons() == ["Preparing"]
    plan = plan_document().to_json()
    kube.stored_job("ns", "j-prepare")["status"] = {
        "succeeded": 1,
        "conditions": [{"type": "Complete", "status": "True"}],
    }
    kube.terminations[("ns", "j-prepare")] = encode_prepare_message({"plan": plan})
    assert rec.reconcile("ns", "j") == "training"
    status = kube.ftjs[("ns", "j")]["status"]
    assert status["plan"] == plan
    assert kube.created[1:] == training_children("j")
    assert ftj["metadata"]["uid"] in {
        o["uid"] for o in kube.stored_job("ns", "j-train")["metadata"]["ownerReferences"]
    }


def test_a_child_name_taken_by_another_object_fails_the_job() -> None:
    kube = FakeKube()
    name = configmap_example(kube)["metadata"]["name"]
    other = b.JobRef(name, "ns", "someone-else")
    kube.ensure(b.control_secret(other, "theirs"))
    rec, events = reconciler(kube)
    assert rec.reconcile("ns", name) == "conflict"
    status = kube.ftjs[("ns", name)]["status"]
    assert status["state"] == "Failed"
    failed = get_condition(status["conditions"], "Failed")
    assert failed is not None
    assert failed["reason"] == "ChildConflict"
    assert events.seen[-1][:2] == ("Warning", "ChildConflict")


def test_a_changed_suspend_is_applied_once() -> None:
    kube = FakeKube()
    name = configmap_example(kube)["metadata"]["name"]
    rec, _ = reconciler(kube)
    rec.reconcile("ns", name)
    kube.ftjs[("ns", name)]["spec"]["suspend"] = True
    assert rec.reconcile("ns", name) == "training"
    assert kube.suspends == [(f"{name}-train", True, "true")]
    assert kube.ftjs[("ns", name)]["status"]["state"] == "Suspended"
    rec.reconcile("ns", name)
    assert len(kube.suspends) == 1


def test_an_invalid_spec_fails_the_job() -> None:
    kube = FakeKube()
    name = configmap_example(kube, backoffLimit=-1)["metadata"]["name"]
    rec, events = reconciler(kube)
    assert rec.reconcile("ns", name) == "invalid"
    assert kube.ftjs[("ns", name)]["status"]["state"] == "Failed"
    assert events.reasons() == ["InvalidSpec"]


# ---- pods the API server refuses ------------------------------------------------------------

SPEC: dict[str, Any] = {"model": {"uri": "hf://gpt2"}, "dataset": {"uri": "pvc://d/t.jsonl"}}


class _RefusingKube(FakeKube):
    """The calls `Reconciler._train` makes for an existing, owned training Job."""

    def __init__(self, failure: str | None, active: int = 0, suspend: bool = False) -> None:
        super().__init__()
        self.failure, self.asked = failure, 0
        self.job = {
            "metadata": {
                "name": "j-train",
                "uid": "job-uid",
                "ownerReferences": [{"uid": "uid"}],
                "annotations": {"kubetune.dev/applied-suspend": str(suspend).lower()},
            },
            "spec": {"suspend": suspend},
            "status": {"active": active, "startTime": "2024-05-06T07:08:09Z"},
        }

    def pod_creation_failure(self, namespace: str, job: dict[str, Any]) -> str | None:
        assert (namespace, job["metadata"]["uid"]) == ("ns", "job-uid")
        self.asked += 1
        return self.failure

    def get_job(self, namespace: str, name: str) -> dict[str, Any]:
        return self.job

    def termination_message(
        self, namespace: str, job_name: str, index: str | None = "0"
    ) -> str | None:
        raise AssertionError("the Job has not finished")


def _train_once(
    kube: _RefusingKube, old: dict[str, Any], stop: bool = False, suspend: bool = False
) -> StatusDraft:
    spec = spec_from(
        SPEC,
        "j",
        "ns",
        resources={"numNodes": 2, "gpusPerNode": 8},
        stopRequested=stop,
        suspend=suspend,
    )
    rec = Reconciler(kube, OperatorSettings())
    # The Job exists, so an earlier reconcile wrote its name in the status.
    draft = StatusDraft(
        ref=b.JobRef("j", "ns", "uid", 1), old={"trainingJobName": "j-train", **old}
    )
    assert rec._train(draft.ref, spec, plan_document(), draft) == "training"
    return draft


@pytest.mark.parametrize(
    ("active", "suspended", "failure", "blocked"),
    [
        (0, False, PSS_REFUSAL, True),
        (1, False, PSS_REFUSAL, True),  # 1 of 2 pods: the run cannot rendezvous
        (2, False, PSS_REFUSAL, False),  # every pod exists: the refusal is history
        (0, True, PSS_REFUSAL, False),  # suspended: no pods are wanted
        (0, False, None, False),  # the pods are merely not created yet
    ],
)
def test_the_reconciler_reports_refused_pods_once_and_keeps_the_message_current(
    active: int, suspended: bool, failure: str | None, blocked: bool
) -> None:
    kube = _RefusingKube(failure, active, suspended)
    draft = _train_once(kube, {}, suspend=suspended)
    assert kube.asked == (0 if active >= 2 or suspended else 1)
    cond = get_condition(draft.conditions, "Running")
    if not blocked:
        assert cond is None or cond["reason"] != "PodCreationFailed"
        assert not any(e[1] == "PodCreationFailed" for e in draft.events)
        return
    assert cond is not None
    assert (cond["status"], cond["reason"]) == ("False", "PodCreationFailed")
    assert cond["message"].startswith(f"Job j-train cannot create its pods: {failure} (")
    assert draft.events == [("Warning", "PodCreationFailed", cond["message"])]
    assert state_of(draft.conditions, True, False) == "Blocked"
    # The next reconcile (a retry names another pod): one Running condition, the message
    # follows, no Event, nothing else changes (no flip through Running=True/Training).
    kube.failure = (failure or "").replace("x2x4k", "q7b9z")
    again = _train_once(kube, draft.new)
    assert again.events == []
    cond = get_condition(again.conditions, "Running")
    assert cond is not None
    assert "q7b9z" in cond["message"]
    third = _train_once(kube, again.new)
    assert third.events == []
    assert not third.changed()


def test_a_stop_request_while_pods_are_refused_says_there_is_nothing_to_stop() -> None:
    kube = _RefusingKube(PSS_REFUSAL)
    draft = _train_once(kube, {}, stop=True)
    cond = get_condition(draft.conditions, "Running")
    assert cond is not None
    assert (cond["status"], cond["reason"]) == ("False", "PodCreationFailed")
    assert "nothing to stop: delete the FineTuneJob to give it up" in cond["message"]
    assert [e[1] for e in draft.events] == ["PodCreationFailed"]
    again = _train_once(kube, draft.new, stop=True)
    assert again.events == []
    assert not again.changed()


def test_a_refusal_that_ended_leaves_blocked_for_starting() -> None:
    kube = _RefusingKube(PSS_REFUSAL)
    draft = _train_once(kube, {})
    kube.failure = None  # a pod was created since (and failed): no refusal holds
    again = _train_once(kube, draft.new)
    cond = get_condition(again.conditions, "Running")
    assert cond is not None
    assert (cond["status"], cond["reason"]) == ("False", "Starting")
    assert state_of(again.conditions, True, False) == "Planned"
    assert again.events == []


class _RefusedPrepareKube(_RefusingKube):
    """The prepare Job exists already (its pod refused before)."""

    def ensure(self, manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        return self.job, False


def _prepare_draft(
    kube: _RefusedPrepareKube, planned: dict[str, Any]
) -> tuple[Reconciler, StatusDraft, FineTuneJobSpec]:
    spec = spec_from(SPEC, "j", "ns")
    rec = Reconciler(kube, OperatorSettings())
    draft = StatusDraft(ref=b.JobRef("j", "ns", "uid", 1), old={"conditions": [planned]})
    return rec, draft, spec


def test_a_refused_prepare_pod_is_preparing_once_created_and_fails_at_its_deadline() -> None:
    refused = cond("Planned", "False", "PodCreationFailed")
    refused["message"] = "Job j-prepare cannot create its pods: quota"
    kube = _RefusedPrepareKube(None, active=1)
    rec, draft, spec = _prepare_draft(kube, refused)
    assert rec._plan_via_pod(draft.ref, spec, draft, 80) is None
    planned = get_condition(draft.conditions, "Planned")
    assert planned is not None
    assert (planned["status"], planned["reason"]) == ("False", "Preparing")
    kube = _RefusedPrepareKube(None)
    kube.job["status"] = {
        "conditions": [
            {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "late"}
        ]
    }
    rec, draft, spec = _prepare_draft(kube, refused)
    with pytest.raises(InputMissingError) as err:
        rec._plan_via_pod(draft.ref, spec, draft, 80)
    assert err.value.reason == "PodCreationFailed"
    assert "j-prepare ran out of its deadline (late) while its pod was refused" in str(err.value)
    assert "the last refusal: Job j-prepare cannot create its pods: quota" in str(err.value)


@pytest.mark.parametrize(
    ("rows", "reason"),
    [
        (
            [{"memorizationRate": 0.7, "heldoutMemorizationRate": 0.1}] * 2,
            "MemorizationExceeded",
        ),
        ([{"generalPerplexityRatio": 2.5}] * 2, "ForgettingExceeded"),
        ([{"memorizationRate": 0.7, "heldoutMemorizationRate": 0.1}], None),
    ],
)
def test_the_operator_stops_a_run_on_the_probe_rules_from_rank_0s_evaluations(
    rows: list[dict[str, float]], reason: str | None
) -> None:
    """The operator's policy reads the probe figures of GET /evaluations (a real rank-0
    endpoint) and, when a probe rule holds, POSTs /stop with its reason and figures; one
    probed evaluation above the margin is not enough."""
    import dataclasses

    from kubetune.trainer.server import ControlServer, TrainerMetrics

    kube = FakeKube()
    ftj = configmap_example(kube)
    name = ftj["metadata"]["name"]
    rec, _ = reconciler(kube)
    rec.reconcile("ns", name)
    token = kube.read_secret_key("ns", f"{name}-control", "token")
    assert token
    metrics = TrainerMetrics()
    server = ControlServer(metrics, token, 0, host="127.0.0.1").start()
    try:
        rec.settings = dataclasses.replace(rec.settings, trainer_metrics_port=server.port)
        for i, figures in enumerate(rows):
            # Eval loss improving: no loss rule holds.
            metrics.history.append({"step": 10 * (i + 1), "evalLoss": 2.0 - 0.1 * i, **figures})
            metrics.evaluations.inc()
        kube.stored_job("ns", f"{name}-train")["status"] = {"active": 1, "ready": 1}
        kube.pod_ips[("ns", f"{name}-train")] = "127.0.0.1"
        assert rec.reconcile("ns", name) == "training"
        if reason is None:
            assert not server.stop_requested.is_set()
        else:
            assert server.stop_requested.is_set()
            assert server.stop_reason == reason
            assert "2 probed evaluation(s) in a row" in server.stop_message
    finally:
        server.close()


def test_a_configmap_job_with_a_weighted_csv_source_is_planned_in_process() -> None:
    kube = FakeKube()
    config_map, job = yaml.safe_load_all((EXAMPLES / "configmap-dataset.yaml").read_text())
    data = dict(config_map["data"])
    data["extra.csv"] = "question,answer\n" + "".join(
        f'"Extra question {i}?","Extra answer {i}."\n' for i in range(10)
    )
    kube.config_maps[("ns", config_map["metadata"]["name"])] = data
    cm = config_map["metadata"]["name"]
    job["spec"]["dataset"]["sources"] = [
        {
            "uri": f"configmap://{cm}/extra.csv",
            "weight": 2,
            "columns": {"prompt": "question", "completion": "answer"},
        }
    ]
    name = kube.add_ftj(job)["metadata"]["name"]
    rec, _ = reconciler(kube)
    assert rec.reconcile("ns", name) == "training"
    plan = kube.ftjs[("ns", name)]["status"]["plan"]
    mixture = next(d for d in plan["decisions"] if d["key"] == "data.mixture")
    assert f"configmap://{cm}/extra.csv x2: " in mixture["sentence"]
    # 30 rows, 6 held out (validationSplit 0.2); the CSV's remaining rows twice.
    assert 20 + 20 - 6 * 2 <= plan["exampleCount"] <= 20 + 20 - 6
    assert plan["exampleCount"] != 30 - 6  # the weight counts
    pod = kube.objects[("Job", "ns", f"{name}-train")]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["KUBETUNE_SOURCE_PATH_1"].endswith("/extra.csv")
    mounts = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
    assert any(env["KUBETUNE_SOURCE_PATH_1"].startswith(m + "/") for m in mounts)
