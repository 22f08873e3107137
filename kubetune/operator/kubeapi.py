"""The Kubernetes API as the reconciler uses it: the calls one reconcile makes, implemented
by `k8s.Kube` (and by an in-memory fake in the unit tests). The Kopf handlers' other calls
(listing jobs, posting Events, the Lease) stay on `Kube` itself."""

from __future__ import annotations

from typing import Any, Protocol


class KubeApi(Protocol):
    # ---- the FineTuneJob
    def get_ftj(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The FineTuneJob, or None when it is gone."""
        ...

    def patch_ftj_status(self, namespace: str, name: str, status: dict[str, Any]) -> None: ...

    def delete_ftj(self, namespace: str, name: str) -> None:
        """Delete it (its children go with it); already gone is no error."""
        ...

    # ---- its children
    def ensure(self, manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create a child, or read the existing one of that name: (object, created).
        Raises `k8s.ChildConflictError` when the existing one is not this job's, and
        `k8s.ChildRejectedError` when the API server refuses the manifest."""
        ...

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def set_job_suspend(self, namespace: str, name: str, suspend: bool, applied: str) -> None:
        """Set the Job's spec.suspend and remember it (`applied`) in its annotation."""
        ...

    # ---- Kueue (only for a job with a queue)
    def job_workloads(self, namespace: str, job_uid: str) -> list[dict[str, Any]] | None:
        """The Kueue Workloads made for the Job of that uid (one list by label); None when
        the API server does not serve Kueue's Workloads."""
        ...

    def get_local_queue(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The LocalQueue, or None when it does not exist."""
        ...

    def pending_workloads(self, namespace: str, queue: str) -> list[dict[str, Any]] | None:
        """The LocalQueue's pending Workloads in order, with their positions, from Kueue's
        visibility API; None when that API cannot be read (not served, down, forbidden)."""
        ...

    def set_workload_active(
        self, namespace: str, name: str, active: bool, job: str, applied: str
    ) -> None:
        """Set the Workload's spec.active (Kueue evicts an inactive one and suspends its
        Job) and remember the spec.suspend value it follows (`applied`) on the Job."""
        ...

    def termination_message(
        self, namespace: str, job_name: str, index: str | None = "0"
    ) -> str | None:
        """The newest termination message of the Job's pod of that completion index (of
        any pod when None)."""
        ...

    def pod_creation_failure(self, namespace: str, job: dict[str, Any]) -> str | None:
        """Why the API server currently refuses the Job's pods (its current FailedCreate
        Event), or None."""
        ...

    def job_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        """The Job's pods, as camelCase dicts."""
        ...

    def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job and (foreground) its pods first; gone already is fine."""
        ...

    def pod0_ip(self, namespace: str, job_name: str) -> str | None:
        """The address of the Job's running pod of completion index 0."""
        ...

    def read_secret_key(self, namespace: str, name: str, key: str) -> str | None: ...

    # ---- the inputs of a plan
    def config_map_key(self, namespace: str, name: str, key: str) -> str | bytes | None:
        """A ConfigMap key's text (bytes for binaryData); None when it is missing."""
        ...

    def list_nodes(self) -> list[dict[str, Any]] | None:
        """All nodes, or None when the operator may not list them."""
        ...
