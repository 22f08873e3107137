"""The one module of the operator that calls the Kubernetes API (synchronous client; Kopf
runs our sync handlers in its thread pool)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.contract import (
    GROUP,
    KUEUE_GROUP,
    KUEUE_VERSION,
    KUEUE_VISIBILITY_GROUP,
    KUEUE_VISIBILITY_VERSION,
    PLURAL,
    SUSPEND_ANNOTATION,
    VERSION,
    WORKLOAD_JOB_UID_LABEL,
)

log = logging.getLogger("kubetune.operator.k8s")

#: The most pending Workloads read from a LocalQueue for a position (Kueue's own default
#: page); a Workload further back shows the queue's pending count instead.
PENDING_WORKLOADS_LIMIT = 1000
#: Kueue's visibility API answers from memory; a slow answer is not worth a reconcile.
VISIBILITY_TIMEOUT_SECONDS = 5.0


class ChildConflictError(RuntimeError):
    """A child's name is taken by an object this FineTuneJob does not own."""


class ChildRejectedError(RuntimeError):
    """The API server refused a child as invalid (422): something in the spec that only the
    server checks, such as a label key or a service account name. Retrying cannot help."""


def _utc(t: Any) -> Any:
    """A client datetime, made aware (UTC) when it came naive."""
    return t if t is None or t.tzinfo else t.replace(tzinfo=dt.UTC)


def _plain(api: client.ApiClient, obj: Any) -> dict[str, Any]:
    data: dict[str, Any] = api.sanitize_for_serialization(obj)
    return data


#: The collection path of each kind of child `ensure` creates.
_CHILD_COLLECTIONS = {
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
    "Service": "/api/v1/namespaces/{ns}/services",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Secret": "/api/v1/namespaces/{ns}/secrets",
}


def slim_node(node: dict[str, Any]) -> dict[str, Any]:
    """What planning reads of a node (its labels, its allocatable GPUs): a cache of
    thousands of nodes keeps only this."""
    meta, status = node.get("metadata") or {}, node.get("status") or {}
    gpus = (status.get("allocatable") or {}).get("nvidia.com/gpu")
    return {
        "metadata": {"name": meta.get("name"), "labels": dict(meta.get("labels") or {})},
        "status": {"allocatable": {"nvidia.com/gpu": gpus} if gpus is not None else {}},
    }


class NodeCache:
    """The cluster's nodes (slim), kept by one list and then a watch from its
    resourceVersion, relisted when the watch expires (410) or fails. `synced` is False
    until the first list is in, and again after a failure until the next one is."""

    WATCH_SECONDS = 300

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._nodes: dict[str, dict[str, Any]] = {}
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.relists = 0

    def synced(self) -> bool:
        return self._synced.is_set()

    def nodes(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._nodes.values())

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True, name="node-cache").start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._list_and_watch()
            except ApiException as exc:
                if exc.status == 403:  # no right to list or watch nodes: plans do without
                    log.warning("node cache off: nodes cannot be listed and watched (403)")
                    self._synced.clear()
                    return
                log.debug("node cache: %s; listing again", exc)
            except Exception as exc:  # a dropped connection, a 410: list again
                log.debug("node cache: %s; listing again", exc)
            self._synced.clear()
            self._stop.wait(1.0)

    def _list_and_watch(self) -> None:
        listed = self.kube._request("GET", "/api/v1/nodes")
        with self._lock:
            self._nodes = {
                str(n["metadata"]["name"]): slim_node(n) for n in listed.get("items") or []
            }
        self.relists += 1
        self._synced.set()
        version = str((listed.get("metadata") or {}).get("resourceVersion") or "")
        while not self._stop.is_set():
            version = self._watch(version)

    def _watch(self, version: str) -> str:
        """One watch request (the server ends it after WATCH_SECONDS), events as JSON
        (not models); the newest resourceVersion seen. Raises on an ERROR event (such as
        410 Gone: the caller lists again)."""
        from kubernetes import watch

        stream = watch.Watch()
        self.kube._count()
        for event in stream.stream(
            self.kube.core.list_node,
            resource_version=version,
            timeout_seconds=self.WATCH_SECONDS,
            allow_watch_bookmarks=True,
            deserialize=False,
        ):
            version = self._apply(event, version)
            if self._stop.is_set():
                stream.stop()
        return version

    def _apply(self, event: dict[str, Any], version: str) -> str:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            raise RuntimeError(f"watch of nodes: {obj.get('message') or obj}")
        meta = obj.get("metadata") or {}
        with self._lock:
            if kind in ("ADDED", "MODIFIED"):
                self._nodes[str(meta.get("name"))] = slim_node(obj)
            elif kind == "DELETED":
                self._nodes.pop(str(meta.get("name")), None)
        return str(meta.get("resourceVersion") or version)


class Kube:
    def __init__(self, api: client.ApiClient | None = None) -> None:
        self.api = api or client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        #: (namespace, HTTP status) of Event reads already logged as failing.
        self._event_errors: set[tuple[str, int]] = set()
        #: HTTP statuses of the visibility API already logged (once each, not per reconcile).
        self._visibility_errors: set[int] = set()
        self.node_cache: NodeCache | None = None
        self.coordination = client.CoordinationV1Api(self.api)
        self.requests = 0
        self._lock = threading.Lock()

    def _count(self) -> None:
        """One API request: counted here, not as a before/after difference around a
        reconcile, which would also count the requests of reconciles running meanwhile."""
        from kubetune.operator import metrics

        with self._lock:
            self.requests += 1
        metrics.API_REQUESTS.inc()

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, Any]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> Any:
        """One request with the client's own steps (its configuration, credentials and
        connection pool), the answer as the API server's JSON: no generated model classes,
        no argument validation, no model-to-dict round trip. The hot calls of a reconcile
        go through here (docs/operator.md, "At scale"). Errors raise `ApiException`."""
        self._count()
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, data, post = self.api.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(method, url, headers, data, post, _request_timeout=timeout)
        response.read()
        if not 200 <= response.status <= 299:
            raise ApiException(http_resp=response)
        return json.loads(response.data) if response.data else None

    def _get(self, path: str, **kw: Any) -> dict[str, Any] | None:
        """GET; None on 404."""
        try:
            found: dict[str, Any] = self._request("GET", path, **kw)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found

    # ---- FineTuneJobs
    def get_ftj(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}")

    def patch_ftj_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._request(
            "PATCH",
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    def list_ftjs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """FineTuneJobs of one namespace, or of all (needs a cluster-wide list right)."""
        self._count()
        if namespace is not None:
            listed = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        else:
            listed = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        items: list[dict[str, Any]] = listed["items"]
        return items

    def post_event(self, obj: dict[str, Any], etype: str, reason: str, message: str) -> None:
        """A core/v1 Event on a FineTuneJob (what `kubectl describe ftj` lists)."""
        import datetime as dt
        import uuid

        meta = obj["metadata"]
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "metadata": {
                "name": f"{meta['name']}.{uuid.uuid4().hex[:12]}",
                "namespace": meta["namespace"],
            },
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", f"{GROUP}/{VERSION}"),
                "kind": obj.get("kind", "FineTuneJob"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": etype,
            "reason": reason,
            "message": message,
            "source": {"component": "kubetune-operator"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "reportingComponent": "kubetune-operator",
        }
        self._count()
        try:
            self.core.create_namespaced_event(meta["namespace"], body)
        except ApiException as exc:  # events are best effort
            log.warning("cannot post event %s on %s: %s", reason, meta["name"], exc.reason)

    def delete_ftj(self, namespace: str, name: str) -> None:
        self._count()
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    # ---- children
    def ensure(self, manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create a child; on 409 read it and check it is ours (same owner uid).
        Returns (object, created)."""
        kind = manifest["kind"]
        ns = manifest["metadata"]["namespace"]
        name = manifest["metadata"]["name"]
        collection = _CHILD_COLLECTIONS[kind].format(ns=ns)
        try:
            created: dict[str, Any] = self._request("POST", collection, body=manifest)
            return created, True
        except ApiException as exc:
            if exc.status == 422:
                raise ChildRejectedError(_server_message(exc)) from None
            if exc.status != 409:
                raise
        existing = self._get(f"{collection}/{name}")
        if existing is None:  # deleted between the create and the read: create it again
            return self.ensure(manifest)
        want = {o["uid"] for o in manifest["metadata"].get("ownerReferences", [])}
        have = {o.get("uid") for o in existing["metadata"].get("ownerReferences") or []}
        if want and not want & have:
            raise ChildConflictError(
                f"{kind} {ns}/{name} already exists and is not owned by this FineTuneJob; "
                "delete it or rename the FineTuneJob"
            )
        return existing, False

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")

    def set_job_suspend(self, namespace: str, name: str, suspend: bool, applied: str) -> None:
        self._count()
        self.batch.patch_namespaced_job(
            name,
            namespace,
            {
                "metadata": {"annotations": {SUSPEND_ANNOTATION: applied}},
                "spec": {"suspend": suspend},
            },
        )

    # ---- Kueue
    def job_workloads(self, namespace: str, job_uid: str) -> list[dict[str, Any]] | None:
        self._count()
        try:
            found = self.custom.list_namespaced_custom_object(
                KUEUE_GROUP,
                KUEUE_VERSION,
                namespace,
                "workloads",
                label_selector=f"{WORKLOAD_JOB_UID_LABEL}={job_uid}",
            )
        except ApiException as exc:
            if exc.status == 404:  # the API server does not serve Kueue's Workloads
                return None
            raise
        return list(found.get("items") or [])

    def get_local_queue(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._count()
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
                KUEUE_GROUP, KUEUE_VERSION, namespace, "localqueues", name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    def pending_workloads(self, namespace: str, queue: str) -> list[dict[str, Any]] | None:
        path = (
            f"/apis/{KUEUE_VISIBILITY_GROUP}/{KUEUE_VISIBILITY_VERSION}/namespaces/{namespace}"
            f"/localqueues/{queue}/pendingworkloads"
        )
        try:
            found = self._request(
                "GET",
                path,
                query=[("limit", PENDING_WORKLOADS_LIMIT)],
                timeout=VISIBILITY_TIMEOUT_SECONDS,
            )
        except ApiException as exc:
            # 404: no visibility API (or no such LocalQueue); 503: its APIService is down;
            # 403: the operator's role lacks it. The position is then just not known.
            if int(exc.status or 0) not in self._visibility_errors:
                self._visibility_errors.add(int(exc.status or 0))
                log.info("no queue positions from Kueue's visibility API (%s)", exc.status)
            return None
        except Exception as exc:  # a timeout or refused connection: likewise unknown
            log.info("no queue positions from Kueue's visibility API: %s", exc)
            return None
        items = (found or {}).get("items") if isinstance(found, dict) else None
        return list(items or [])

    def set_workload_active(
        self, namespace: str, name: str, active: bool, job: str, applied: str
    ) -> None:
        self._count()
        self.custom.patch_namespaced_custom_object(
            KUEUE_GROUP, KUEUE_VERSION, namespace, "workloads", name, {"spec": {"active": active}}
        )
        self._count()
        self.batch.patch_namespaced_job(
            job, namespace, {"metadata": {"annotations": {SUSPEND_ANNOTATION: applied}}}
        )

    def termination_message(
        self, namespace: str, job_name: str, index: str | None = "0"
    ) -> str | None:
        """The newest termination message of a Job's pod (the given completion index)."""
        self._count()
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"job-name={job_name}")
        best: tuple[str, str] | None = None
        for pod in pods.items:
            ann = pod.metadata.annotations or {}
            if (
                index is not None
                and ann.get("batch.kubernetes.io/job-completion-index", index) != index
            ):
                continue
            if pod.status and pod.status.phase == "Failed" and pod.status.message:
                finished = str(pod.metadata.creation_timestamp or "")
                if best is None or finished > best[0]:
                    best = (finished, str(pod.status.message))
            for cs in (pod.status.container_statuses or []) if pod.status else []:
                term = cs.state.terminated if cs.state else None
                if term is None or not term.message:
                    continue
                finished = str(term.finished_at or "")
                if best is None or finished > best[0]:
                    best = (finished, term.message)
        return best[1] if best else None

    def pod_creation_failure(self, namespace: str, job: dict[str, Any]) -> str | None:
        """The Job's current `FailedCreate` Event (its pods refused: Pod Security, a quota,
        an admission webhook), or None. Events from before the Job's (re)start, its last
        suspension or resumption, or its newest pod are history. Best effort: an API error
        (403 when RBAC hides Events) is logged once and read as None, so it never stops the
        reconcile."""
        from kubetune.operator.status import current_creation_failure, parse_time

        meta, status = job.get("metadata") or {}, job.get("status") or {}
        self._count()
        try:
            events = self.core.list_namespaced_event(
                namespace,
                field_selector=f"involvedObject.uid={meta.get('uid')},reason=FailedCreate",
            ).items
            pods = []
            if events:
                self._count()
                pods = self.core.list_namespaced_pod(
                    namespace,
                    label_selector=f"batch.kubernetes.io/controller-uid={meta.get('uid')}",
                ).items
        except ApiException as exc:
            if (namespace, exc.status) not in self._event_errors:
                self._event_errors.add((namespace, exc.status))
                log.warning(
                    "cannot read the FailedCreate Events or pods of Job %s/%s (%s %s): refused "
                    "pods will not be reported%s",
                    namespace,
                    meta.get("name"),
                    exc.status,
                    exc.reason,
                    "; grant list on events" if exc.status == 403 else "",
                )
            return None
        self._event_errors = {e for e in self._event_errors if e[0] != namespace}
        suspensions = [
            parse_time(c.get("lastTransitionTime"))
            for c in status.get("conditions") or []
            if c.get("type") == "Suspended"
        ]
        floor = [parse_time(status.get("startTime")), *suspensions]
        floor += [_utc(p.metadata.creation_timestamp) for p in pods]
        timed = []
        for e in events:
            times = [
                _utc(t)
                for t in (
                    e.series.last_observed_time if e.series else None,
                    e.last_timestamp,
                    e.event_time,
                    e.metadata.creation_timestamp if e.metadata else None,
                )
                if t is not None
            ]
            if times and e.message:
                timed.append((max(times), str(e.message)))
        return current_creation_failure(timed, [t for t in floor if t is not None])

    def job_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        listed = self._request(
            "GET",
            f"/api/v1/namespaces/{namespace}/pods",
            query=[("labelSelector", f"job-name={job_name}")],
        )
        return list(listed.get("items") or [])

    def delete_job(self, namespace: str, name: str) -> None:
        self._count()
        try:
            self.batch.delete_namespaced_job(
                name, namespace, body=client.V1DeleteOptions(propagation_policy="Foreground")
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def pod0_ip(self, namespace: str, job_name: str) -> str | None:
        for pod in self.job_pods(namespace, job_name):
            ann = (pod.get("metadata") or {}).get("annotations") or {}
            status = pod.get("status") or {}
            if (
                ann.get("batch.kubernetes.io/job-completion-index") == "0"
                and status.get("phase") == "Running"
                and status.get("podIP")
            ):
                return str(status["podIP"])
        return None

    def read_secret_key(self, namespace: str, name: str, key: str) -> str | None:
        import base64

        self._count()
        try:
            data = self.core.read_namespaced_secret(name, namespace).data or {}
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        raw = data.get(key)
        return base64.b64decode(raw).decode() if raw else None

    # ---- leader election
    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._count()
        try:
            return _plain(self.api, self.coordination.read_namespaced_lease(name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def write_lease(self, body: dict[str, Any], create: bool) -> bool:
        """Create or replace (with the resourceVersion read); False on a lost race."""
        meta = body["metadata"]
        self._count()
        try:
            if create:
                self.coordination.create_namespaced_lease(meta["namespace"], body)
            else:
                self.coordination.replace_namespaced_lease(meta["name"], meta["namespace"], body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    # ---- inputs
    def config_map_key(self, namespace: str, name: str, key: str) -> str | bytes | None:
        """A ConfigMap key's text (bytes for binaryData, so that a wrong encoding is
        reported, not replaced); None when the ConfigMap or key is missing."""
        self._count()
        try:
            cm = self.core.read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        if cm.data and key in cm.data:
            return str(cm.data[key])
        if cm.binary_data and key in cm.binary_data:
            import base64

            return base64.b64decode(cm.binary_data[key])
        return None

    def list_nodes(self) -> list[dict[str, Any]] | None:
        """All nodes (what planning reads of them: `slim_node`), from the watch-fed cache
        once it has listed them (`start_node_cache`), else one list; None when RBAC does not
        let us list them."""
        cache = self.node_cache
        if cache is not None and cache.synced():
            return cache.nodes()
        try:
            listed = self._request("GET", "/api/v1/nodes")
        except ApiException as exc:
            if exc.status == 403:
                return None
            raise
        return [slim_node(n) for n in listed.get("items") or []]

    def start_node_cache(self) -> NodeCache:
        """Follow the nodes with one watch instead of a list per plan."""
        if self.node_cache is None:
            self.node_cache = NodeCache(self)
            self.node_cache.start()
        return self.node_cache


def _server_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body).get("message") or exc.reason)
    except (TypeError, ValueError):
        return str(exc.reason)
