"""Pure builders: a FineTuneJob (its identity, spec and plan) -> child manifests.

Children, all owned by the FineTuneJob and named deterministically:
- `<job>-prepare`  batch/v1 Job (CPU) that reads the data and model config and plans,
                   when the operator cannot plan in-process (`prepare.py`);
- `<job>-config`   ConfigMap with the resolved spec and the plan (`config.py`);
- `<job>-control`  Secret with the token the operator uses to talk to the trainer
                   (`config.py`);
- `<job>-train`    headless Service for rendezvous, and the Indexed batch/v1 Job (one pod
                   per node) that runs torchrun + DeepSpeed (`training.py`).

Their names, owner reference and labels are in `names.py`, the volumes and paths of the
inputs and the output in `storage.py`, and what every pod has in `pod.py`.
"""

from kubetune.operator.builders.config import CONTROL_TOKEN_KEY, config_map, control_secret
from kubetune.operator.builders.names import (
    JobRef,
    config_name,
    control_name,
    labels,
    owner_reference,
    prepare_name,
    train_name,
)
from kubetune.operator.builders.objects import model_cache
from kubetune.operator.builders.pod import (
    POD_SECURITY_CONTEXT,
    SECURITY_CONTEXT,
    TRAINER_HOME,
    WRITABLE_DIRS,
)
from kubetune.operator.builders.prepare import prepare_job
from kubetune.operator.builders.storage import Storage, output_uri, storage_for
from kubetune.operator.builders.training import headless_service, torchrun_command, training_job

__all__ = [
    "CONTROL_TOKEN_KEY",
    "POD_SECURITY_CONTEXT",
    "SECURITY_CONTEXT",
    "TRAINER_HOME",
    "WRITABLE_DIRS",
    "JobRef",
    "Storage",
    "config_map",
    "config_name",
    "control_name",
    "control_secret",
    "headless_service",
    "labels",
    "model_cache",
    "output_uri",
    "owner_reference",
    "prepare_job",
    "prepare_name",
    "storage_for",
    "torchrun_command",
    "train_name",
    "training_job",
]
