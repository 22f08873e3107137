"""Run a command in an image built by tools/images.sh, with runc and no container engine.

The image is mounted with buildah (the script's own storage), a runtime spec is written next to
it and `runc run` starts it in fresh namespaces, network included (loopback only: nothing in the
container can reach anything outside it). The spec sets no rlimits: raising RLIMIT_NOFILE or
NPROC above the hard limit, which podman's and buildah's defaults do, needs CAP_SYS_RESOURCE,
which these machines lack.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
IMAGES_SH = ROOT / "tools" / "images.sh"
RUNC_ROOT = "/run/kubetune-node-tests-runc"


@dataclass(frozen=True)
class ImageConfig:
    """What the image's config says a container runs: user, environment, working directory."""

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: tuple[str, ...]
    user: str
    workdir: str


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def image_config(inspect: dict[str, Any]) -> ImageConfig:
    """The OCI config of `buildah inspect --type image` output."""
    config = inspect["OCIv1"]["config"]
    return ImageConfig(
        entrypoint=tuple(config.get("Entrypoint") or ()),
        cmd=tuple(config.get("Cmd") or ()),
        env=tuple(config.get("Env") or ()),
        user=config.get("User") or "0:0",
        workdir=config.get("WorkingDir") or "/",
    )


def uid_gid(user: str) -> tuple[int, int]:
    """`USER 1000:1000` as numbers; a name is refused (the images use numeric uids)."""
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise ValueError(f"USER {user!r} is not numeric uid[:gid]")
    return int(uid), int(gid or uid)


def runtime_spec(
    rootfs: Path,
    config: ImageConfig,
    args: Sequence[str],
    *,
    read_only: bool,
    tmpfs: Sequence[str] = (),
) -> dict[str, Any]:
    """An OCI runtime spec that runs `args` as the image's user, with no capabilities, no new
    privileges, no rlimits set, its own network namespace and, if asked, a read-only root with a
    tmpfs at each path in `tmpfs` (what the chart's emptyDirs give a pod)."""
    uid, gid = uid_gid(config.user)
    caps: list[str] = []
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
    ]
    mounts += [
        {
            "destination": path,
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777", "size=262144k"],
        }
        for path in tmpfs
    ]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": list(args),
            "env": list(config.env),
            "cwd": config.workdir,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": read_only},
        "hostname": "kubetune-test",
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
        },
    }


def images_sh(*args: str, timeout: float = 600) -> str:
    result = subprocess.run(
        [str(IMAGES_SH), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"tools/images.sh {' '.join(args)}: {result.stderr[-3000:]}")
    return result.stdout.strip()


@contextmanager
def mounted(name: str) -> Iterator[tuple[Path, ImageConfig]]:
    """A buildah working container of image NAME, mounted: (its root, the image's config)."""
    ref = images_sh("--stored", name, timeout=1800)
    config = image_config(json.loads(images_sh("buildah", "inspect", "--type", "image", ref)))
    ctr = images_sh("buildah", "from", "--quiet", "--pull-never", ref)
    try:
        yield Path(images_sh("buildah", "mount", ctr)), config
    finally:
        images_sh("buildah", "rm", ctr)


def run_in(
    rootfs: Path,
    config: ImageConfig,
    args: Sequence[str] | None = None,
    *,
    read_only: bool = True,
    tmpfs: Sequence[str] = ("/tmp",),
    timeout: float = 300,
) -> Result:
    """Run `args` (default: the image's entrypoint and command) in the mounted image."""
    argv = list(args) if args is not None else [*config.entrypoint, *config.cmd]
    with tempfile.TemporaryDirectory(prefix="kubetune-bundle-") as tmp:
        bundle = Path(tmp)
        spec = runtime_spec(rootfs, config, argv, read_only=read_only, tmpfs=tmpfs)
        (bundle / "config.json").write_text(json.dumps(spec))
        cid = f"kubetune-test-{uuid.uuid4().hex[:12]}"
        try:
            done = subprocess.run(
                ["runc", "--root", RUNC_ROOT, "run", "--bundle", str(bundle), cid],
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        finally:
            subprocess.run(
                ["runc", "--root", RUNC_ROOT, "delete", "--force", cid],
                capture_output=True,
                check=False,
            )
    return Result(done.returncode, done.stdout, done.stderr)
