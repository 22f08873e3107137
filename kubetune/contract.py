"""The contract between the operator (and `kubetune run`) and the pods it starts: the API's
names, the labels and annotations on child objects, the exit codes, the `KUBETUNE_*`
environment, the termination messages and the plan keys a method switch replaces.

Both sides import these names from here and nowhere else; this module imports nothing of
kubetune, so the operator can use it without the trainer's stack (docs/design.md, layers).
"""

from __future__ import annotations

import base64
import gzip
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

# ---- the API ----------------------------------------------------------------------------------
GROUP: Final = "kubetune.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "FineTuneJob"
PLURAL: Final = "finetunejobs"
SINGULAR: Final = "finetunejob"
SHORT_NAME: Final = "ftj"
CATEGORY: Final = "kubetune"
CRD_NAME: Final = f"{PLURAL}.{GROUP}"

# ---- labels and annotations on the children ---------------------------------------------------
JOB_LABEL: Final = f"{GROUP}/job"
COMPONENT_LABEL: Final = f"{GROUP}/component"
MANAGED_BY: Final[Mapping[str, str]] = {
    "app.kubernetes.io/managed-by": "kubetune-operator",
    "app.kubernetes.io/name": "kubetune",
}
#: The spec.suspend value the operator last applied to the training Job (so a queue's own
#: suspension is told apart from the user's).
SUSPEND_ANNOTATION: Final = f"{GROUP}/applied-suspend"
#: On the training pods: the method they train (for people and dashboards).
PLAN_METHOD_ANNOTATION: Final = f"{GROUP}/plan-method"
TRAINER_CONTAINER: Final = "trainer"
PREPARE_CONTAINER: Final = "prepare"
#: Where the operator mounts the `<job>-config` ConfigMap (spec.json, plan.json).
CONFIG_MOUNT: Final = "/etc/kubetune"

# ---- Kueue (the queue that admits a training Job; docs/operator.md "Queues") ----------------
KUEUE_GROUP: Final = "kueue.x-k8s.io"
#: The API version of Kueue's objects the operator reads (Workloads, LocalQueues).
KUEUE_VERSION: Final = "v1beta2"
#: On the training Job (from spec.labels or the operator's default queue): the LocalQueue.
QUEUE_LABEL: Final = f"{KUEUE_GROUP}/queue-name"
#: On the training Job (from spec.labels): the WorkloadPriorityClass of its Workload.
PRIORITY_LABEL: Final = f"{KUEUE_GROUP}/priority-class"
#: On a Workload: the uid of the Job it was made for.
WORKLOAD_JOB_UID_LABEL: Final = f"{KUEUE_GROUP}/job-uid"
#: Kueue's visibility API (an aggregated API server): a LocalQueue's pending Workloads with
#: their positions, at .../namespaces/<ns>/localqueues/<name>/pendingworkloads.
KUEUE_VISIBILITY_GROUP: Final = f"visibility.{KUEUE_GROUP}"
KUEUE_VISIBILITY_VERSION: Final = "v1beta2"

# ---- exit codes -------------------------------------------------------------------------------
EXIT_OK: Final = 0
#: Configuration or data errors (sysexits' EX_CONFIG): the operator's podFailurePolicy fails
#: the Job at once on it instead of retrying.
EXIT_CONFIG_ERROR: Final = 78
#: Stopped by SIGTERM after saving a checkpoint (128 + SIGTERM, as a shell reports it): a pod
#: deleted, drained, suspended or preempted. The job resumes from that checkpoint; the
#: operator restarts a multi-node gang for it without counting it against backoffLimit.
EXIT_INTERRUPTED: Final = 143
#: The termination message's reason for EXIT_INTERRUPTED (the launcher maps torchrun's
#: generic failure back to the code by it).
REASON_INTERRUPTED: Final = "Interrupted"


# ---- the environment --------------------------------------------------------------------------
class Env:
    """The `KUBETUNE_*` variables the trainer and the prepare step read."""

    JOB_NAME: Final = "KUBETUNE_JOB_NAME"
    JOB_NAMESPACE: Final = "KUBETUNE_JOB_NAMESPACE"
    CONFIG_DIR: Final = "KUBETUNE_CONFIG_DIR"
    SPEC_JSON: Final = "KUBETUNE_SPEC_JSON"
    PLAN_JSON: Final = "KUBETUNE_PLAN_JSON"
    MODEL_PATH: Final = "KUBETUNE_MODEL_PATH"
    DATASET_PATH: Final = "KUBETUNE_DATASET_PATH"
    VALIDATION_PATH: Final = "KUBETUNE_VALIDATION_PATH"
    GENERAL_TEXT_PATH: Final = "KUBETUNE_GENERAL_TEXT_PATH"
    PREVIOUS_PATH: Final = "KUBETUNE_PREVIOUS_PATH"
    AUGMENTATION_MODEL_PATH: Final = "KUBETUNE_AUGMENTATION_MODEL_PATH"
    OUTPUT_PATH: Final = "KUBETUNE_OUTPUT_PATH"
    GPU_MEMORY_GIB: Final = "KUBETUNE_GPU_MEMORY_GIB"
    NUM_NODES: Final = "KUBETUNE_NUM_NODES"
    METRICS_PORT: Final = "KUBETUNE_METRICS_PORT"
    METRICS_HOST: Final = "KUBETUNE_METRICS_HOST"
    STOP_POLICY: Final = "KUBETUNE_STOP_POLICY"
    CONTROL_TOKEN: Final = "KUBETUNE_CONTROL_TOKEN"
    #: In pods, every secret is a file (`secret_value`): the variable NAME_FILE names the
    #: file of the secret NAME (KUBETUNE_CONTROL_TOKEN_FILE, HF_TOKEN_FILE, ...).
    CONTROL_TOKEN_FILE: Final = "KUBETUNE_CONTROL_TOKEN_FILE"
    TERMINATION_MESSAGE_PATH: Final = "KUBETUNE_TERMINATION_MESSAGE_PATH"
    MODEL_CACHE: Final = "KUBETUNE_MODEL_CACHE"
    #: spec.storage.s3 as the pods (and `kubetune` locally) read it; the credentials are
    #: the standard AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
    S3_ENDPOINT_URL: Final = "KUBETUNE_S3_ENDPOINT_URL"
    S3_REGION: Final = "KUBETUNE_S3_REGION"
    S3_PATH_STYLE: Final = "KUBETUNE_S3_PATH_STYLE"
    #: An s3:// spec.output.uri: the trainer writes to OUTPUT_PATH (a local directory) and
    #: uploads each checkpoint and the final output there.
    OUTPUT_URI: Final = "KUBETUNE_OUTPUT_URI"
    #: spec.storage.modelCache: where the prepare step downloads the base model once (the
    #: training pods then read it from KUBETUNE_MODEL_PATH, the same directory).
    MODEL_FETCH_DIR: Final = "KUBETUNE_MODEL_FETCH_DIR"
    #: A local directory a pod stages s3:// inputs in (an emptyDir).
    WORK_DIR: Final = "KUBETUNE_WORK_DIR"
    #: `kubetune run`: the file rank 0 appends its console events to (kubetune.console),
    #: for the CLI to render; unset in a pod, where rank 0 writes plain lines to stdout.
    EVENTS_PATH: Final = "KUBETUNE_EVENTS_PATH"
    #: "1": the libraries' output (and HF's per-step logs) stay on the console.
    VERBOSE: Final = "KUBETUNE_VERBOSE"
    #: The process group's timeout: the longest one rank waits in a collective (from the
    #: plan: `kubetune.planning.interruption.stop_times`).
    COLLECTIVE_TIMEOUT: Final = "KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS"
    #: After SIGTERM, how long torchrun waits for its workers to save and stop before it
    #: kills them (the pod's grace period less the launcher's margin).
    SHUTDOWN_TIMEOUT: Final = "KUBETUNE_SHUTDOWN_TIMEOUT_SECONDS"
    #: Plain output: seconds between two progress lines (default 30).
    PROGRESS_SECONDS: Final = "KUBETUNE_PROGRESS_SECONDS"


#: Where the operator mounts the Secrets a pod reads (each in its own directory): the control
#: token, the hub token, the object store's credentials. Files, not environment variables,
#: so that they are not in the pod spec's env, in a crash dump of the environment, or in
#: every child process's environment.
SECRETS_MOUNT: Final = "/var/run/secrets/kubetune"
#: The suffix of the variable that names a secret's file (the convention of many images).
SECRET_FILE_SUFFIX: Final = "_FILE"


def secret_value(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The secret NAME: the variable NAME when it is set (local runs, `kubetune run`), else
    the content of the file that NAME_FILE names (pods), stripped of its trailing newline;
    None when neither is set. A NAME_FILE that cannot be read is an error naming it."""
    source = os.environ if env is None else env
    value = source.get(name)
    if value:
        return value
    path = source.get(name + SECRET_FILE_SUFFIX)
    if not path:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ValueError(
            f"{name}{SECRET_FILE_SUFFIX}={path}: cannot read the secret file ({exc.strerror}); "
            "check that the Secret exists and has that key"
        ) from exc
    return text or None


#: The most training files spec.dataset.sources mixes with spec.dataset.uri.
MAX_DATA_SOURCES: Final = 7


def source_role(index: int) -> str:
    """The input role of spec.dataset.sources[index]."""
    return f"source{index + 1}"


#: Each input the trainer reads from a path, by role, and the variable that names the path.
#: `kubetune.api.inputs.trainer_input_uris` maps a spec to the same roles; the operator
#: (a path inside the pod) and `kubetune run` (a local path) both set every one present.
INPUT_ENV: Final[Mapping[str, str]] = {
    "model": Env.MODEL_PATH,
    "dataset": Env.DATASET_PATH,
    "validation": Env.VALIDATION_PATH,
    "general": Env.GENERAL_TEXT_PATH,
    "previous": Env.PREVIOUS_PATH,
    "augmentation": Env.AUGMENTATION_MODEL_PATH,
    # spec.dataset.sources[i] (i from 0) is the role source{i+1}.
    **{source_role(i): f"KUBETUNE_SOURCE_PATH_{i + 1}" for i in range(MAX_DATA_SOURCES)},
}

#: Who runs the early-stop policy (`KUBETUNE_STOP_POLICY`): the trainer itself (local runs)
#: or the operator, which reads /evaluations and sends /stop.
STOP_POLICY_TRAINER: Final = "trainer"
STOP_POLICY_OPERATOR: Final = "operator"

# ---- termination messages ---------------------------------------------------------------------
DEFAULT_TERMINATION_PATH: Final = "/dev/termination-log"
#: The kubelet keeps 4 KiB of a termination message; both writers stay under this.
TERMINATION_LIMIT_BYTES: Final = 3800
#: The keys of the trainer's final message that the operator reads into status.
TRAINER_MESSAGE_KEYS: Final = (
    "metrics",
    "progress",
    "earlyStop",
    "output",
    "warnings",
    "decisions",
)
#: A method switch's plan keeps these in a message that would be too long otherwise.
SHORT_PLAN_KEYS: Final = ("method", "zeroStage", "offload", "trainableParameters", "memory")

#: The plan keys a method switch replaces (the trainer sends them in its decision; the
#: operator puts them into status.plan).
SWITCHED_PLAN_KEYS: Final = (
    "method",
    "zeroStage",
    "offload",
    "trainableParameters",
    "memory",
    "hyperparameters",
    "warnings",
    "remedies",
    "switchedFrom",
)


def termination_path(env: Mapping[str, str] | None = None) -> Path:
    """Where a container writes its termination message: the kubelet reads the pod spec's
    path; the local pod runner and `kubetune run` name another file in the environment."""
    source = os.environ if env is None else env
    return Path(source.get(Env.TERMINATION_MESSAGE_PATH) or DEFAULT_TERMINATION_PATH)


def encode_prepare_message(result: Mapping[str, Any]) -> str:
    """The prepare step's result: compact JSON, or gzip+base85 behind `gz:` when it would not
    fit the kubelet's limit (base85 is a sixteenth shorter than base64)."""
    text = json.dumps(result, separators=(",", ":"), sort_keys=True)
    if len(text.encode()) <= TERMINATION_LIMIT_BYTES:
        return text
    packed = "gz:" + base64.b85encode(gzip.compress(text.encode(), 9)).decode()
    if len(packed) > TERMINATION_LIMIT_BYTES:
        raise ValueError(f"the plan is too large for a termination message ({len(packed)} B)")
    return packed


def decode_prepare_message(message: str) -> dict[str, Any]:
    """The inverse of `encode_prepare_message` (and of earlier versions' gzip+base64)."""
    if message.startswith("gz:"):
        body = message[3:]
        try:
            raw = gzip.decompress(base64.b85decode(body))
        except (ValueError, OSError, EOFError):
            raw = gzip.decompress(base64.b64decode(body))
        message = raw.decode()
    data: dict[str, Any] = json.loads(message)
    return data
