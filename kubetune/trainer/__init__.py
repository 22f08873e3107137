"""The trainer: `python -m kubetune.trainer` (under torchrun) fine-tunes a causal LM as the
plan says, with Hugging Face `Trainer`, `peft` and DeepSpeed, plus kubetune's callbacks
(metrics, early stopping, the stop endpoint) and outputs (adapter or weights, plan, metrics
history, report). Imports torch; the operator never imports this package."""

import os
from pathlib import Path

# Exit codes (the operator's podFailurePolicy fails a Job at once on CONFIG_ERROR).
EXIT_OK = 0
EXIT_CRASH = 1
EXIT_CONFIG_ERROR = 78

# Where a container writes its termination message: the kubelet reads the pod spec's path;
# the local pod runner and `kubetune run` name another file in this variable.
TERMINATION_ENV = "KUBETUNE_TERMINATION_MESSAGE_PATH"


def termination_path(env: dict[str, str] | None = None) -> Path:
    source = os.environ if env is None else env
    return Path(source.get(TERMINATION_ENV) or "/dev/termination-log")
