"""The images built from Dockerfile.operator and Dockerfile.trainer (tools/images.sh, buildah on a
local Debian base), run with runc: what they contain, who they run as, and that the operator's
runs on the read-only root filesystem the chart gives it."""

from __future__ import annotations

import json
import subprocess
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.node import oci

# A cold build of the trainer image takes many minutes (the session fixture builds it).
pytestmark = [pytest.mark.node, pytest.mark.timeout(3600)]

TORCH_STACK = ("torch", "transformers", "deepspeed", "peft", "accelerate", "bitsandbytes")
SITE = "opt/kubetune/lib/python3.11/site-packages"


def _root_mount_options(mounts: str) -> list[str]:
    root = next(line.split() for line in mounts.splitlines() if line.split()[1] == "/")
    return root[3].split(",")


def test_the_archives_name_the_references_the_chart_and_the_node_use(
    image_archives: dict[str, str],
) -> None:
    refs = dict(line.split("=", 1) for line in oci.images_sh("--print-refs").splitlines())
    assert set(image_archives) == set(refs) == {"pause", "operator", "trainer"}
    for name, archive in image_archives.items():
        with tarfile.open(archive) as tar:
            member = tar.extractfile("manifest.json")
            assert member is not None, archive
            (manifest,) = json.load(member)
        assert manifest["RepoTags"] == [refs[name]]
        assert refs[name].startswith(f"localhost/kubetune/{name}:")


def test_the_operator_image_has_no_torch_and_imports_the_operator(
    image_archives: dict[str, str],
) -> None:
    with oci.mounted("operator") as (rootfs, config):
        site = rootfs / SITE
        assert (site / "kopf").is_dir()
        assert (site / "kubetune" / "operator").is_dir()
        present = [p.name for p in site.iterdir() if p.name.split("-")[0].lower() in TORCH_STACK]
        assert present == [], f"the operator image holds the trainer's stack: {present}"
        listed = oci.run_in(rootfs, config, ["pip", "list", "--format=json"])
        assert listed.returncode == 0, listed.stderr
        names = {p["name"].lower() for p in json.loads(listed.stdout)}
        assert {"kopf", "kubernetes", "kubetune"} <= names
        assert not names & set(TORCH_STACK)
        code = (
            "import importlib.util, kubetune.operator.main; "
            "assert importlib.util.find_spec('torch') is None; print('imported')"
        )
        imported = oci.run_in(rootfs, config, ["python", "-c", code])
        assert (imported.returncode, imported.stdout.strip()) == (0, "imported"), imported.stderr


def test_the_operator_image_runs_as_non_root_on_a_read_only_root(
    image_archives: dict[str, str],
) -> None:
    with oci.mounted("operator") as (rootfs, config):
        assert config.user == "10001:10001"
        assert config.entrypoint == ("kopf",)
        code = (
            "import os, sys; print(os.getuid(), os.getgid()); "
            "open('/tmp/written', 'w').write('x'); print(open('/proc/self/mounts').read())"
        )
        # Read-only root and a tmpfs at /tmp: what the chart's Deployment gives the container.
        seen = oci.run_in(rootfs, config, ["python", "-c", code], read_only=True, tmpfs=["/tmp"])
        assert seen.returncode == 0, seen.stderr
        ids, mounts = seen.stdout.split("\n", 1)
        assert ids == "10001 10001"
        assert "ro" in _root_mount_options(mounts)
        # The image's own entrypoint (kopf) starts there and knows the chart's flags.
        helped = oci.run_in(rootfs, config, ["kopf", "run", "--help"], read_only=True)
        assert helped.returncode == 0, helped.stderr
        for flag in ("--standalone", "--liveness", "--all-namespaces"):
            assert flag in helped.stdout


def test_the_trainer_image_imports_the_torch_stack_and_runs_the_trainer(
    image_archives: dict[str, str],
) -> None:
    with oci.mounted("trainer") as (rootfs, config):
        assert config.user == "1000:1000"
        assert config.entrypoint == ("python", "-m", "kubetune.trainer")
        code = (
            "import os, torch, transformers, deepspeed, peft, accelerate, kubetune.trainer, "
            "kubetune.prepare; print(os.getuid(), torch.__version__.split('+')[0], "
            "torch.cuda.is_available())"
        )
        imported = oci.run_in(rootfs, config, ["python", "-c", code], read_only=False, timeout=600)
        assert imported.returncode == 0, imported.stderr[-3000:]
        uid, torch_version, _cuda = imported.stdout.split()[-3:]
        assert uid == "1000"
        assert torch_version == "2.15.0"
        helped = oci.run_in(rootfs, config, [*config.entrypoint, "--help"], read_only=False)
        assert helped.returncode == 0, helped.stderr[-3000:]
        assert "--config-dir" in helped.stdout
        # DeepSpeed's CPU shared-memory collective op is prebuilt (a CPU rank loads it at
        # start; compiled on use it cost every new pod tens of seconds), for the CPU
        # accelerator DeepSpeed will find in a CPU pod.
        code = (
            "import os; os.environ['DS_ACCELERATOR'] = 'cpu'; "
            "from deepspeed.git_version_info import installed_ops, accelerator_name; "
            "print(bool(installed_ops.get('deepspeed_shm_comm')), accelerator_name)"
        )
        ops = oci.run_in(rootfs, config, ["python", "-c", code], read_only=True, timeout=300)
        assert ops.returncode == 0, ops.stderr[-3000:]
        assert ops.stdout.split()[-2:] == ["True", "cpu"], ops.stdout[-2000:]


def test_the_pause_image_sleeps_until_it_is_told_to_stop(image_archives: dict[str, str]) -> None:
    with oci.mounted("pause") as (rootfs, config), tempfile.TemporaryDirectory() as tmp:
        assert config.user == "65535:65535"
        spec = oci.runtime_spec(rootfs, config, [*config.entrypoint, *config.cmd], read_only=True)
        (Path(tmp) / "config.json").write_text(json.dumps(spec))
        cid = f"kubetune-pause-{uuid.uuid4().hex[:12]}"
        runc = ["runc", "--root", oci.RUNC_ROOT]
        proc = subprocess.Popen([*runc, "run", "--bundle", tmp, cid], stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            state: dict[str, str] = {}
            while time.monotonic() < deadline and state.get("status") != "running":
                out = subprocess.run([*runc, "state", cid], capture_output=True, text=True)
                state = json.loads(out.stdout) if out.returncode == 0 else {}
                time.sleep(0.2)
            assert state.get("status") == "running"
            time.sleep(1)
            assert proc.poll() is None, "the pause process exited by itself"
            subprocess.run([*runc, "kill", cid, "TERM"], check=True)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            subprocess.run([*runc, "delete", "--force", cid], capture_output=True, check=False)


def test_an_unchanged_input_set_is_a_cache_hit(image_archives: dict[str, str]) -> None:
    start = time.monotonic()
    done = subprocess.run(
        [str(oci.IMAGES_SH)], capture_output=True, text=True, timeout=120, check=True
    )
    took = time.monotonic() - start
    for name in ("base", "pause", "operator", "trainer"):
        assert f"{name}: up to date" in done.stderr, done.stderr
    assert took < 30, f"a cache hit took {took:.0f}s"
