"""A real S3-compatible server on 127.0.0.1 for the tests and the dev cluster: SeaweedFS
(`weed server` with its master, one volume server, a filer and the S3 gateway in one
process), built from its Go module by `tools/build.sh seaweedfs`, on free loopback ports,
with one access key that may do everything and the data in a throwaway directory."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kubetune.devcluster.binaries import read_versions, tools_dir
from kubetune.devcluster.cluster import _die_with_parent, _terminate, free_port


def weed_binary() -> Path:
    version = read_versions()["SEAWEEDFS_VERSION"]
    return tools_dir() / f"seaweedfs-{version}" / "weed"


def s3_identities(access_key: str, secret_key: str) -> dict[str, object]:
    """SeaweedFS's S3 configuration: one identity with every action."""
    return {
        "identities": [
            {
                "name": "kubetune",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def server_args(binary: Path, directory: Path, ports: dict[str, int], config: Path) -> list[str]:
    """`weed server` on 127.0.0.1 with every port (and its gRPC port) given."""
    return [
        str(binary),
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={directory}",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master_grpc']}",
        "-master.volumeSizeLimitMB=64",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume_grpc']}",
        "-volume.max=100",
        "-filer",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer_grpc']}",
        f"-filer.localSocket={directory}/filer.sock",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3_grpc']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        f"-metricsPort={ports['metrics']}",
    ]


@dataclass
class S3Server:
    directory: Path
    access_key: str = "kubetune-test"
    secret_key: str = ""
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        binary = weed_binary()
        if not binary.exists():
            raise FileNotFoundError(f"{binary} is missing: run `tools/build.sh seaweedfs`")
        self.secret_key = self.secret_key or secrets.token_hex(16)
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
        ports = {name: free_port() for name in (*names, "s3", "s3_grpc", "metrics")}
        self.port = ports["s3"]
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.directory / "s3.json"
        config.write_text(json.dumps(s3_identities(self.access_key, self.secret_key)))
        log = (self.directory / "weed.log").open("wb")
        self.process = subprocess.Popen(
            server_args(binary, data, ports, config),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        """Until the S3 gateway answers (an unsigned request is refused with 403)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited: {self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint_url, timeout=2)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"the S3 gateway did not answer in {timeout:g}s: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        path = self.directory / "weed.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            _terminate(self.process.pid, 10.0)
        self.process = None
