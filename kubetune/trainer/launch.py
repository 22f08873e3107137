"""`python -m kubetune.trainer.launch <torchrun arguments>`: what a training pod runs.

torchrun reports any failed worker as exit code 1, which would hide the trainer's
configuration-error code (78) from the Job's podFailurePolicy, and bad data would be
retried on GPUs up to backoffLimit. So this launcher first checks the configuration and
the data in-process (exit 78 at once, before any GPU work), then runs torchrun, and maps a
failure whose termination message says ConfigError back to 78.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

from kubetune.contract import EXIT_CONFIG_ERROR, termination_path


def precheck() -> str | None:
    """The configuration or data error that would stop every rank, or None."""
    from kubetune.data import DataError
    from kubetune.trainer.config import TrainerConfigError, load_config
    from kubetune.trainer.data import read_sources

    try:
        cfg = load_config(None)
        read_sources(cfg.spec, cfg.dataset, cfg.sources, cfg.validation)
    except (TrainerConfigError, DataError, OSError, ValueError) as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    error = precheck()
    if error is not None:
        print(f"configuration error: {error}", file=sys.stderr)
        with contextlib.suppress(OSError):
            termination_path().write_text(json.dumps({"error": error, "reason": "ConfigError"}))
        return EXIT_CONFIG_ERROR
    code = subprocess.call([sys.executable, "-m", "torch.distributed.run", *args])
    if code != 0:
        try:
            message = json.loads(termination_path().read_text())
        except (OSError, ValueError):
            message = {}
        if isinstance(message, dict) and message.get("reason") == "ConfigError":
            return EXIT_CONFIG_ERROR
    return code


if __name__ == "__main__":
    sys.exit(main())
