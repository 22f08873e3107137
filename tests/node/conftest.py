"""The node tier: real containers. The images come from tools/images.sh (`make images`): built
once with buildah and cached by content, so a session whose inputs did not change only reads
the cache. Skipped, saying why, only where the script cannot run (not root, or buildah,
debootstrap, busybox-static or runc missing: `apt-get install buildah debootstrap busybox-static
runc`)."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.node import oci


def why_images_cannot_build() -> str | None:
    if os.geteuid() != 0:
        return "the node tier needs root (buildah's overlay storage, debootstrap, runc)"
    missing = [c for c in ("buildah", "debootstrap", "runc") if shutil.which(c) is None]
    if not os.path.exists("/bin/busybox"):
        missing.append("busybox-static")
    if missing:
        return (
            f"the node tier needs {', '.join(missing)}: "
            "apt-get install buildah debootstrap busybox-static runc"
        )
    return None


@pytest.fixture(scope="session")
def image_archives() -> dict[str, str]:
    """NAME=archive of pause, operator and trainer, built if missing (a cold build takes minutes:
    `make images` first)."""
    reason = why_images_cannot_build()
    if reason:
        pytest.skip(reason)
    out = oci.images_sh("--print-archives", timeout=3600)
    return dict(line.split("=", 1) for line in out.splitlines())
