"""The plan phase: plan in-process when the inputs can be read through the API (ConfigMaps
and a model config the operator ships or finds in a ConfigMap), else through the prepare
Job, whose pod writes the plan to its termination message."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlparse

from pydantic import ValidationError

from kubetune.api.plan import PlanDocument
from kubetune.api.spec import FineTuneJobSpec
from kubetune.contract import decode_prepare_message
from kubetune.data import DataError
from kubetune.operator import builders as b
from kubetune.operator import status as st
from kubetune.operator.reconcile.base import ReconcilerBase
from kubetune.operator.reconcile.draft import StatusDraft
from kubetune.planning import ModelConfigError
from kubetune.planning.job import (
    PlanRequestError,
    build_plan,
    known_model_config,
    resolve_gpu_memory,
)


class InputMissingError(RuntimeError):
    """An input the plan needs cannot be read; the message says which and how to fix it."""

    def __init__(self, message: str, reason: str = "DataError") -> None:
        super().__init__(message)
        self.reason = reason


class PlanPhase(ReconcilerBase):
    def _plan(
        self, ref: b.JobRef, spec: FineTuneJobSpec, draft: StatusDraft
    ) -> PlanDocument | None:
        """Plan in-process when the inputs can be read through the API, else via the
        prepare Job. Returns the plan once known."""
        nodes = (
            self.kube.list_nodes()
            if int(spec.resources.gpus_per_node) > 0 and not (spec.resources.gpu_memory_gib)
            else []
        )
        gpu_memory = resolve_gpu_memory(spec, nodes, self.settings.default_gpu_memory_gib)
        try:
            inputs = self._inputs_via_api(ref, spec)
            if inputs is not None:
                plan = build_plan(
                    spec,
                    inputs["train"],
                    spec.dataset.uri,
                    inputs["model"],
                    spec.model.uri,
                    gpu_memory,
                    inputs.get("validation"),
                    spec.dataset.validation_uri or "",
                    extra_sources=inputs["sources"],
                )
            else:
                from_pod = self._plan_via_pod(ref, spec, draft, gpu_memory[0])
                if from_pod is None:
                    return None
                plan = from_pod
        except (DataError, ModelConfigError, ValueError) as exc:
            reason = (
                "ModelConfigError"
                if isinstance(exc, ModelConfigError)
                else "InvalidSpec"
                if isinstance(exc, PlanRequestError)
                else "DataError"
            )
            draft.fail(reason, str(exc))
            return None
        except InputMissingError as exc:
            if exc.reason == "InputNotFound":
                # Like a pod waiting for its ConfigMap: not fatal, retried every resync.
                before = st.get_condition(draft.conditions, "Planned") or {}
                draft.condition("Planned", "False", "InputNotFound", str(exc))
                if before.get("reason") != "InputNotFound":
                    draft.events.append(("Warning", "InputNotFound", str(exc)))
                return None
            draft.fail(exc.reason, str(exc))
            return None
        draft.new["plan"] = plan.to_json()
        warnings = list(dict.fromkeys([*draft.new.get("warnings", []), *plan.warnings]))
        draft.new["warnings"] = warnings
        if plan.fits:
            draft.plan_ready(plan)
        else:
            draft.condition("Planned", "False", "DoesNotFit", plan.error or "the plan does not fit")
        return plan

    def _inputs_via_api(self, ref: b.JobRef, spec: FineTuneJobSpec) -> dict[str, Any] | None:
        """Dataset (and validation set) from ConfigMaps and a model config we ship or that
        sits in a ConfigMap: everything needed to plan without a pod. None otherwise."""
        sources = spec.dataset.sources or []
        uris = (
            [spec.dataset.uri]
            + ([spec.dataset.validation_uri] if spec.dataset.validation_uri else [])
            + [source.uri for source in sources]
        )
        if not all(u.startswith("configmap://") for u in uris):
            return None
        if b.model_cache(ref, spec, read_only=False) is not None:
            return None  # the prepare pod downloads the model into the job's cache
        model = known_model_config(spec.model.uri)
        if model is None and spec.model.uri.startswith("configmap://"):
            text = self._config_map_uri(ref, spec.model.uri, "spec.model.uri")
            try:
                model = json.loads(text)
            except ValueError as exc:
                raise InputMissingError(
                    f"{spec.model.uri}: not valid JSON ({exc})", "ModelConfigError"
                ) from exc
        if model is None:
            return None
        out: dict[str, Any] = {
            "model": model,
            "train": self._config_map_uri(ref, spec.dataset.uri, "spec.dataset.uri"),
            "sources": [
                (self._config_map_uri(ref, s.uri, f"spec.dataset.sources[{i}].uri"), s.uri)
                for i, s in enumerate(sources)
            ],
        }
        if spec.dataset.validation_uri:
            out["validation"] = self._config_map_uri(
                ref, spec.dataset.validation_uri, "spec.dataset.validationUri"
            )
        return out

    def _config_map_uri(self, ref: b.JobRef, uri: str, field_path: str) -> str | bytes:
        parsed = urlparse(uri)
        cm, key = parsed.netloc, parsed.path.lstrip("/")
        text = self.kube.config_map_key(ref.namespace, cm, key)
        if text is None:
            raise InputMissingError(
                f"{field_path}: ConfigMap {ref.namespace}/{cm} has no key {key!r} (or does "
                "not exist); waiting for it: create it or fix the URI",
                "InputNotFound",
            )
        return text

    def _plan_via_pod(
        self, ref: b.JobRef, spec: FineTuneJobSpec, draft: StatusDraft, gpu_memory_gib: float
    ) -> PlanDocument | None:
        manifest = b.prepare_job(ref, spec, self.settings, gpu_memory_gib)
        job, created = self.kube.ensure(manifest)
        if created:
            draft.events.append(
                (
                    "Normal",
                    "Preparing",
                    f"started {manifest['metadata']['name']} to read the data "
                    "and the model config and plan",
                )
            )
        view = st.view_job(job)
        planned = st.get_condition(draft.conditions, "Planned") or {}
        if (
            view.failed_reason == "DeadlineExceeded"
            and planned.get("reason") == "PodCreationFailed"
        ):
            # Its deadline ran out while the API server refused the pod: say that, not DataError.
            raise InputMissingError(
                f"{b.prepare_name(ref)} ran out of its deadline ({view.failed_message}) while "
                f"its pod was refused; the last refusal: {planned.get('message')}",
                "PodCreationFailed",
            )
        if view.failed_reason:
            message = self.kube.termination_message(ref.namespace, b.prepare_name(ref), None)
            try:
                result = decode_prepare_message(message or "")
            except ValueError:
                result = {}
            raise InputMissingError(
                str(
                    result.get("error")
                    or message
                    or view.failed_message
                    or "the prepare step failed; see its pod's logs"
                ),
                str(result.get("reason") or "DataError"),
            )
        if not view.complete:
            blocked = self._pods_blocked(ref, job, view, 1)
            if blocked:
                draft.say_blocked("Planned", blocked)
            elif planned.get("reason") == "PodCreationFailed" and (view.active or view.succeeded):
                draft.condition(
                    "Planned",
                    "False",
                    "Preparing",
                    f"{b.prepare_name(ref)} reads the data and the model config and plans",
                )
            return None
        message = self.kube.termination_message(ref.namespace, b.prepare_name(ref), None)
        if not message:
            raise InputMissingError("the prepare step finished without writing a plan")
        result = decode_prepare_message(message)
        if "plan" not in result:
            raise InputMissingError(str(result.get("error", "the prepare step wrote no plan")))
        try:
            return PlanDocument.from_compact_json(result["plan"])
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InputMissingError(
                f"the prepare step wrote a plan this operator cannot read ({first['msg']} at "
                f"{where}); use the trainer image of this operator's version (spec.image)"
            ) from exc
