"""A hub model's parameter counts from its safetensors headers without its weights
(kubetune.planning.hubweights through huggingface_hub's get_safetensors_metadata), against a
local HTTP server on 127.0.0.1 that mimics only what that call asks of the hub (HEAD and
ranged GET of /{repo}/resolve/{revision}/{file}), via HF_ENDPOINT; and offline, from the hub
cache. The same server, with the two API routes snapshot_download asks, fills the job's model
cache (spec.storage.modelCache) from the hub in the prepare step."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from kubetune.planning import bundled_architectures
from kubetune.planning.hubweights import hub_weight_counts
from kubetune.planning.job import model_arch_with_weights
from tests.unit.test_planning_model import _safetensors

pytestmark = pytest.mark.unit

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def new_family(tmp_path: Path) -> tuple[dict[str, object], dict[str, bytes]]:
    """A config of a family outside the table and its repository's files: the shard index
    and two header-only shards (what a header read needs)."""
    config = json.loads(bundled_architectures()["qwen2-0.5b"].read_text())
    config["model_type"] = "brand_new_family"
    h, inner, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shards: list[dict[str, list[int]]] = [{"model.embed_tokens.weight": [vocab, h]}, {}]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shard = shards[i % 2]
        shard.update({p + f"self_attn.{n}.weight": [h, h] for n in ("q_proj", "o_proj")})
        shard.update({p + f"self_attn.{n}.weight": [h // 7, h] for n in ("k_proj", "v_proj")})
        shard.update({p + f"mlp.{n}.weight": [inner, h] for n in ("gate_proj", "up_proj")})
        shard[p + "mlp.down_proj.weight"] = [h, inner]
    shards[1]["model.norm.weight"] = [h]
    files: dict[str, bytes] = {}
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        name = f"model-0000{n}-of-00002.safetensors"
        _safetensors(tmp_path / name, shard)
        files[name] = (tmp_path / name).read_bytes()
        weight_map.update(dict.fromkeys(shard, name))
    files["model.safetensors.index.json"] = json.dumps({"weight_map": weight_map}).encode()
    files["config.json"] = json.dumps(config).encode()
    return config, files


def expected_parameters(files: dict[str, bytes]) -> int:
    total = 0
    for name, raw in files.items():
        if name.endswith(".safetensors"):
            n = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8 : 8 + n])
            total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


class Hub(BaseHTTPRequestHandler):
    """HEAD and GET (with Range) of /{org}/{name}/resolve/{revision}/{file}; 404 otherwise,
    with the hub's error code, as huggingface_hub reads it."""

    repos: ClassVar[dict[str, dict[str, bytes]]] = {}
    seen: ClassVar[list[str]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _file(self) -> bytes | None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return None
        return self.repos.get("/".join(parts[:2]), {}).get("/".join(parts[4:]))

    def _headers(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{abs(hash(body))}"')
        self.end_headers()

    def _missing(self) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", "EntryNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self.seen.append(f"HEAD {self.path}")
        data = self._file()
        if data is None:
            self._missing()
        else:
            self._headers(data)

    def do_GET(self) -> None:
        self.seen.append(f"GET {self.path} {self.headers.get('range', '')}")
        data = self._file()
        if data is None:
            self._missing()
            return
        status, body = 200, data
        if rng := self.headers.get("range"):
            start, _, end = rng.removeprefix("bytes=").partition("-")
            body = data[int(start) : int(end) + 1 if end else None]
            status = 206
        self._headers(body, status)
        self.wfile.write(body)


@contextlib.contextmanager
def local_hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> Iterator[type[Hub]]:
    import huggingface_hub.constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    importlib.reload(huggingface_hub.constants)
    Hub.seen = []
    try:
        yield Hub
    finally:
        server.shutdown()
        server.server_close()
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)


def test_counts_come_from_the_hub_headers_without_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, files = new_family(tmp_path)
    Hub.repos = {"acme/brand-new": files}
    with local_hub(monkeypatch, tmp_path / "cache") as hub:
        counts, why = hub_weight_counts("acme/brand-new", None, None)
        missing, missing_why = hub_weight_counts("acme/absent", None, None)
    assert why == ""
    assert counts is not None
    assert counts.parameters == expected_parameters(files)
    assert counts.files == ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    # Only headers were read: every GET of a shard asked for a range.
    shard_gets = [s for s in hub.seen if s.startswith("GET") and ".safetensors " in s]
    assert shard_gets
    assert all("bytes=" in s for s in shard_gets)
    assert missing is None
    assert "could not be read" in missing_why
    arch = model_arch_with_weights(config, "hf://acme/brand-new", (counts, why))
    assert arch.total_parameters == counts.parameters
    assert any("safetensors headers" in note for note in arch.notes)
    # Without counts: the config's shapes, and the plan's notes say why.
    shaped = model_arch_with_weights(config, "hf://acme/absent", (None, missing_why))
    assert any("could not be read" in note for note in shaped.notes)


def test_offline_counts_come_from_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.unit.hubcache import hub_env

    _, files = new_family(tmp_path)
    snap = tmp_path / "hub" / "models--acme--brand-new" / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / "config.json").write_bytes(files["config.json"])
    (snap / "model.safetensors.index.json").write_bytes(files["model.safetensors.index.json"])
    with hub_env(monkeypatch, tmp_path / "hub"):
        # The index only (the weights were never fetched): no counts, and why.
        assert hub_weight_counts("acme/brand-new", None, None, snap) == (
            None,
            "offline, and the hub cache holds no safetensors weights",
        )
        for name, raw in files.items():
            (snap / name).write_bytes(raw)
        counts, why = hub_weight_counts("acme/brand-new", None, None, snap)
    assert counts is not None
    assert (counts.parameters, why) == (expected_parameters(files), "")


class HubWithApi(Hub):
    """Also the model API routes snapshot_download asks first:
    /api/models/{org}/{name}/revision/{revision} (the commit) and
    /api/models/{org}/{name}/tree/{revision} (the repository's files, one page)."""

    def do_GET(self) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:2] != ["api", "models"] or len(parts) < 6:
            super().do_GET()
            return
        self.seen.append(f"GET {self.path}")
        repo, route = "/".join(parts[2:4]), parts[4]
        files = self.repos.get(repo)
        if files is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        answer: object = (
            {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
            if route == "revision"
            else [
                {"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                for f, d in files.items()
            ]
        )
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_the_model_cache_is_filled_once_from_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """spec.storage.modelCache with an hf:// model: the prepare step downloads every file of
    the repository once into the cache (what the training pods then load), and a later
    prepare pod finds it complete and asks the hub nothing."""
    from kubetune import prepare
    from kubetune.contract import Env
    from kubetune.data.objectstore import COMPLETE_MARKER
    from kubetune.planning import ModelConfigError

    _, files = new_family(tmp_path)
    files["tokenizer_config.json"] = b"{}"
    HubWithApi.repos = {"acme/brand-new": files}
    cache = tmp_path / "modelcache" / "ns" / "job" / "model"
    env = {Env.MODEL_PATH: "hf://acme/brand-new", Env.MODEL_FETCH_DIR: str(cache)}
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubWithApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    importlib.reload(huggingface_hub.constants)
    try:
        HubWithApi.seen = []
        staged = prepare.stage(env, None)
        assert staged[Env.MODEL_PATH] == str(cache)
        for name, data in files.items():
            assert (cache / name).read_bytes() == data, name
        assert (cache / COMPLETE_MARKER).read_text() == "hf://acme/brand-new"
        assert any(
            s.startswith("GET /api/models/acme/brand-new/revision/") for s in HubWithApi.seen
        )
        HubWithApi.seen = []
        assert prepare.stage(env, None)[Env.MODEL_PATH] == str(cache)
        assert HubWithApi.seen == []  # complete: nothing asked of the hub
        # A repository the hub does not have fails the plan (reason ModelConfigError, naming
        # the field), the cache left incomplete for the next prepare pod.
        missing = tmp_path / "other"
        with pytest.raises(
            ModelConfigError,
            match=r"spec\.model\.uri: cannot download hf://acme/absent into "
            r"spec\.storage\.modelCache \(RepositoryNotFoundError",
        ):
            prepare.stage(
                {**env, Env.MODEL_PATH: "hf://acme/absent", Env.MODEL_FETCH_DIR: str(missing)}, None
            )
        assert not (missing / COMPLETE_MARKER).exists()
    finally:
        server.shutdown()
        server.server_close()
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)
