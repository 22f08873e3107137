"""`python -m kubetune.operator`: run the operator (all namespaces unless told)."""

from __future__ import annotations

import sys

from kopf import cli as kopf_cli


def main() -> None:
    args = sys.argv[1:] or ["--all-namespaces"]
    sys.exit(
        kopf_cli.main(
            ["run", "--standalone", "-m", "kubetune.operator.main", *args], standalone_mode=True
        )
    )


if __name__ == "__main__":
    main()
