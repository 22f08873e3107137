"""Where the control-plane binaries built by `make tools` (tools/build.sh) live."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "tools" / "versions.env"


class ToolsMissingError(RuntimeError):
    """A binary of the local control plane has not been built on this machine."""


def tools_dir() -> Path:
    """The cache the binaries are built into (outside the repository)."""
    env = os.environ.get("KUBETUNE_TOOLS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "kubetune" / "bin"


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """Parse tools/versions.env (KEY=value lines, # comments)."""
    versions: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}: malformed line {raw!r}; expected KEY=value")
        versions[key.strip()] = value.strip()
    return versions


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of every binary the dev cluster and the tests use."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    kwok: Path
    helm: Path
    prometheus: Path
    promtool: Path
    # The real node's (the `node` tier; `make tools` builds them too).
    kubelet: Path
    kube_proxy: Path
    coredns: Path
    crictl: Path

    def missing(self) -> list[Path]:
        return [p for p in vars(self).values() if not os.access(p, os.X_OK)]


def find_binaries(root: Path | None = None, versions: dict[str, str] | None = None) -> Binaries:
    """Resolve binary paths from versions.env; KUBETUNE_BIN_<NAME> overrides one path."""
    root = root or tools_dir()
    v = versions or read_versions()

    def at(tool: str, version_key: str, binary: str) -> Path:
        override = os.environ.get("KUBETUNE_BIN_" + binary.upper().replace("-", "_"))
        return Path(override) if override else root / f"{tool}-{v[version_key]}" / binary

    return Binaries(
        etcd=at("etcd", "ETCD_VERSION", "etcd"),
        kube_apiserver=at("kubernetes", "K8S_VERSION", "kube-apiserver"),
        kube_controller_manager=at("kubernetes", "K8S_VERSION", "kube-controller-manager"),
        kube_scheduler=at("kubernetes", "K8S_VERSION", "kube-scheduler"),
        kubectl=at("kubernetes", "K8S_VERSION", "kubectl"),
        kwok=at("kwok", "KWOK_VERSION", "kwok"),
        helm=at("helm", "HELM_VERSION", "helm"),
        prometheus=at("prometheus", "PROMETHEUS_VERSION", "prometheus"),
        promtool=at("prometheus", "PROMETHEUS_VERSION", "promtool"),
        kubelet=at("kubelet", "K8S_VERSION", "kubelet"),
        kube_proxy=at("kubelet", "K8S_VERSION", "kube-proxy"),
        coredns=at("coredns", "COREDNS_VERSION", "coredns"),
        crictl=at("cri-tools", "CRI_TOOLS_VERSION", "crictl"),
    )


def require(paths: list[Path]) -> None:
    """Raise a ToolsMissingError naming what is missing and the command that builds it."""
    missing = [p for p in paths if not os.access(p, os.X_OK)]
    if missing:
        names = ", ".join(str(p) for p in missing)
        raise ToolsMissingError(
            f"control-plane binaries not built: {names}. Run `make tools` (tools/build.sh) "
            "once on this machine; it builds them from their Go modules into "
            f"{tools_dir()} (set KUBETUNE_TOOLS_DIR to use another cache)."
        )
