"""tools/images.sh without building anything: what its image tags are a hash of, and the message
it stops with when buildah or debootstrap is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
INPUTS = (
    "Dockerfile.operator",
    "Dockerfile.trainer",
    ".dockerignore",
    "pyproject.toml",
    "README.md",
)


def _copy_of_the_inputs(tmp: Path) -> Path:
    repo = tmp / "repo"
    (repo / "tools").mkdir(parents=True)
    shutil.copy2(ROOT / "tools" / "images.sh", repo / "tools" / "images.sh")
    for name in INPUTS:
        shutil.copy2(ROOT / name, repo / name)
    shutil.copytree(
        ROOT / "kubetune", repo / "kubetune", ignore=shutil.ignore_patterns("__pycache__")
    )
    return repo


def _refs(repo: Path) -> dict[str, str]:
    out = subprocess.run(
        [str(repo / "tools" / "images.sh"), "--print-refs"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


@pytest.mark.skipif(
    not Path("/etc/apt").is_dir(), reason="the base's hash names the host's Debian mirror"
)
def test_the_tags_change_with_their_inputs_only(tmp_path: Path) -> None:
    repo = _copy_of_the_inputs(tmp_path)
    first = _refs(repo)
    assert set(first) == {"pause", "operator", "trainer"}
    assert _refs(repo) == first
    # __pycache__ is not copied into the images (.dockerignore), so it does not count.
    (repo / "kubetune" / "__pycache__").mkdir(exist_ok=True)
    (repo / "kubetune" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    assert _refs(repo) == first
    with (repo / "kubetune" / "operator" / "main.py").open("a") as f:
        f.write("\n# a source change\n")
    changed = _refs(repo)
    assert changed["pause"] == first["pause"]
    assert changed["operator"] != first["operator"]
    assert changed["trainer"] != first["trainer"]
    with (repo / "Dockerfile.trainer").open("a") as f:
        f.write("\n# a trainer-only change\n")
    again = _refs(repo)
    assert again["operator"] == changed["operator"]
    assert again["trainer"] != changed["trainer"]


def test_missing_buildah_and_debootstrap_are_named_with_the_fix(tmp_path: Path) -> None:
    # A PATH with the script's shell tools but neither buildah nor debootstrap.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "id", "date", "ldd", "cat", "sha256sum", "cut", "env"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    done = subprocess.run(
        [str(bin_dir / "bash"), str(ROOT / "tools" / "images.sh"), "operator"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": str(bin_dir)},
        check=False,
        timeout=60,
    )
    assert done.returncode != 0
    if os.geteuid() != 0:
        assert "needs root" in done.stderr
    else:
        assert "missing: buildah debootstrap" in done.stderr
        assert "apt-get install -y buildah debootstrap busybox-static" in done.stderr


def test_an_unknown_image_is_refused_by_name() -> None:
    done = subprocess.run(
        [str(ROOT / "tools" / "images.sh"), "--print-archives", "nope"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode != 0
    assert "unknown image 'nope' (base, pause, operator, trainer)" in done.stderr
