"""`python -m kubetune.trainer [--config-dir DIR]` (torchrun starts one per process)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune.trainer", description="Fine-tune as the plan says (one process)."
    )
    parser.add_argument(
        "--config-dir",
        type=Path,
        default=None,
        help="directory with spec.json and plan.json (the job's ConfigMap)",
    )
    args = parser.parse_args(argv)
    from kubetune.trainer.config import load_config
    from kubetune.trainer.recipe import main_entry

    return main_entry(lambda: load_config(args.config_dir))


if __name__ == "__main__":
    sys.exit(main())
