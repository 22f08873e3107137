"""`s3://bucket/key` inputs and outputs on an S3-compatible object store, through pyarrow's
S3 filesystem (pyarrow is already the `datasets` library's columnar engine, so this adds no
dependency; s3fs would bring botocore, whose python-dateutil<3 pin conflicts with the
Kubernetes client's >=3).

The pure part (the URI, the settings from the spec and the environment, the messages) is
tested on its own; `fetch`, `upload` and `sync_deletions` are the thin I/O at the edge.
Every error is an `ObjectStoreError` (a ValueError, so the prepare step and the trainer's
precheck report it as a data/configuration error) naming the spec field and the URI.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Final
from urllib.parse import urlparse

from kubetune.contract import Env, secret_value

if TYPE_CHECKING:
    from pyarrow.fs import S3FileSystem

S3_PREFIX: Final = "s3://"
DEFAULT_REGION: Final = "us-east-1"
#: The credential variables (the Secret's keys, and what `kubetune` reads locally).
ACCESS_KEY_ENV: Final = "AWS_ACCESS_KEY_ID"
SECRET_KEY_ENV: Final = "AWS_SECRET_ACCESS_KEY"
_BUCKET = re.compile(r"[a-z0-9][-a-z0-9.]{1,61}[a-z0-9]")


class ObjectStoreError(ValueError):
    """An s3:// URI cannot be read or written; the message names the field and the URI."""


def is_s3(uri: str | None) -> bool:
    return bool(uri) and str(uri).startswith(S3_PREFIX)


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key (or a key prefix: a "directory"; empty for the whole bucket)."""

    bucket: str
    key: str = ""

    @property
    def path(self) -> str:
        """The `bucket/key` path of pyarrow's filesystem."""
        return f"{self.bucket}/{self.key}".rstrip("/")

    @property
    def uri(self) -> str:
        return f"{S3_PREFIX}{self.path}"

    @property
    def name(self) -> str:
        """The last part of the key (the file name of an object)."""
        return PurePosixPath(self.key).name

    def join(self, relative: str) -> S3Location:
        key = "/".join(p for p in (self.key.strip("/"), relative.strip("/")) if p)
        return S3Location(self.bucket, key)


def parse_s3_uri(uri: str, field: str) -> S3Location:
    """`s3://bucket/key` as a location; an error naming `field` when it is not one."""
    if not uri.startswith(S3_PREFIX):
        raise ObjectStoreError(f"{field}: {uri!r} is not an s3://bucket/key URI")
    bucket, _, key = uri.removeprefix(S3_PREFIX).partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ObjectStoreError(
            f"{field}: {uri!r}: {bucket!r} is not a bucket name (3-63 lowercase letters, "
            "digits, dots and hyphens)"
        )
    if "//" in key or any(part in (".", "..") for part in key.split("/")):
        raise ObjectStoreError(f"{field}: {uri!r}: the key has an empty, . or .. part")
    return S3Location(bucket, key.strip("/"))


@dataclass(frozen=True)
class S3Settings:
    """Where the object store is and who we are to it."""

    endpoint_url: str | None = None
    region: str = DEFAULT_REGION
    path_style: bool = True
    access_key: str | None = None
    secret_key: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Settings:
        """What the pods get (`storage_env`), or a local shell's AWS_* variables."""
        env = os.environ if env is None else env
        endpoint = (
            env.get(Env.S3_ENDPOINT_URL)
            or env.get("AWS_ENDPOINT_URL_S3")
            or env.get("AWS_ENDPOINT_URL")
            or None
        )
        return cls(
            endpoint_url=endpoint,
            region=env.get(Env.S3_REGION) or env.get("AWS_REGION") or DEFAULT_REGION,
            path_style=(env.get(Env.S3_PATH_STYLE) or "true").lower() != "false",
            access_key=secret_value(ACCESS_KEY_ENV, env),
            secret_key=secret_value(SECRET_KEY_ENV, env),
        )

    def with_spec(
        self, endpoint_url: str | None, region: str | None, path_style: bool | None
    ) -> S3Settings:
        """spec.storage.s3's endpoint, region and style over the environment's."""
        return S3Settings(
            endpoint_url=endpoint_url or self.endpoint_url,
            region=region or self.region,
            path_style=self.path_style if path_style is None else path_style,
            access_key=self.access_key,
            secret_key=self.secret_key,
        )

    def env(self) -> dict[str, str]:
        """These settings as the variables `from_env` reads (credentials included)."""
        out = {Env.S3_REGION: self.region, Env.S3_PATH_STYLE: str(self.path_style).lower()}
        if self.endpoint_url:
            out[Env.S3_ENDPOINT_URL] = self.endpoint_url
        if self.access_key and self.secret_key:
            out[ACCESS_KEY_ENV] = self.access_key
            out[SECRET_KEY_ENV] = self.secret_key
        return out


def endpoint_parts(endpoint_url: str) -> tuple[str, str]:
    """`http://host:port` as pyarrow's (scheme, endpoint_override)."""
    parsed = urlparse(endpoint_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ObjectStoreError(
            f"storage.s3.endpointUrl: {endpoint_url!r} must be http://host[:port] or "
            "https://host[:port]"
        )
    return parsed.scheme, parsed.netloc


def filesystem(settings: S3Settings) -> S3FileSystem:
    from pyarrow.fs import AwsStandardS3RetryStrategy, S3FileSystem

    kwargs: dict[str, object] = {}
    if settings.endpoint_url:
        scheme, endpoint = endpoint_parts(settings.endpoint_url)
        kwargs.update(scheme=scheme, endpoint_override=endpoint)
    if settings.access_key and settings.secret_key:
        kwargs.update(access_key=settings.access_key, secret_key=settings.secret_key)
    return S3FileSystem(
        region=settings.region,
        force_virtual_addressing=not settings.path_style,
        connect_timeout=10,
        request_timeout=60,
        retry_strategy=AwsStandardS3RetryStrategy(max_attempts=3),
        **kwargs,
    )


def explain(exc: BaseException, field: str, uri: str, writing: bool = False) -> str:
    """An object store failure as one sentence that names the field, the URI and the fix."""
    text = str(exc)
    upper = text.upper()
    if "NO_SUCH_BUCKET" in upper or "NOSUCHBUCKET" in upper:
        bucket = uri.removeprefix(S3_PREFIX).split("/", 1)[0]
        return f"{field}: {uri}: the bucket {bucket!r} does not exist; create it or fix the URI"
    if any(
        code in upper
        for code in (
            "ACCESS_DENIED",
            "ACCESSDENIED",
            "INVALID_ACCESS_KEY_ID",
            "INVALIDACCESSKEYID",
            "SIGNATURE_DOES_NOT_MATCH",
            "SIGNATUREDOESNOTMATCH",
            "HTTP STATUS 403",
        )
    ):
        return (
            f"{field}: {uri}: access denied by the object store; check the credentials "
            f"(the {ACCESS_KEY_ENV}/{SECRET_KEY_ENV} keys of storage.s3.credentialsSecret, "
            "or the environment for kubetune on this machine)"
        )
    if any(code in upper for code in ("COULDN'T CONNECT", "CURL ERROR", "NETWORK_CONNECTION")):
        return (
            f"{field}: {uri}: the object store cannot be reached ({text.strip()}); "
            "check storage.s3.endpointUrl"
        )
    verb = "write" if writing else "read"
    return f"{field}: {uri}: cannot {verb} it ({text.strip()})"


def fetch(
    uri: str,
    dest: Path,
    field: str,
    settings: S3Settings,
    only: Collection[str] | None = None,
) -> Path:
    """Download an object (to `dest/<its name>`) or every object under a prefix (to `dest`,
    keeping their relative paths; with `only`, just those names directly under it, each if
    present). Returns the local file or directory."""
    from pyarrow.fs import FileSelector, FileType

    location = parse_s3_uri(uri, field)
    fs = filesystem(settings)
    try:
        info = fs.get_file_info(location.path)
        if info.type == FileType.File and location.key:
            dest.mkdir(parents=True, exist_ok=True)
            target = dest / location.name
            _download(fs, location.path, target)
            return target
        entries = (
            fs.get_file_info(FileSelector(location.path, recursive=True))
            if info.type == FileType.Directory
            else []
        )
        files = [e for e in entries if e.type == FileType.File]
        if not files and fs.get_file_info(location.bucket).type == FileType.NotFound:
            raise ObjectStoreError(
                f"{field}: {uri}: the bucket {location.bucket!r} does not exist (or these "
                "credentials cannot see it); create it or fix the URI"
            )
        if not files:
            raise ObjectStoreError(
                f"{field}: {uri}: no object or prefix with objects there; upload it or fix the URI"
            )
        dest.mkdir(parents=True, exist_ok=True)
        for entry in files:
            relative = entry.path[len(location.path) :].lstrip("/")
            if only is not None and relative not in only:
                continue
            _download(fs, entry.path, dest / relative)
    except ObjectStoreError:
        raise
    except OSError as exc:
        raise ObjectStoreError(explain(exc, field, uri)) from exc
    return dest


def _download(fs: S3FileSystem, path: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with fs.open_input_stream(path) as src, partial.open("wb") as out:
        while chunk := src.read(8 << 20):
            out.write(chunk)
    partial.replace(target)


def upload(
    local: Path,
    uri: str,
    field: str,
    settings: S3Settings,
    skip: Collection[str] = (),
) -> int:
    """Upload a file (to the key `uri`) or a directory tree (under the prefix `uri`), leaving
    out the top-level entries named in `skip`. Returns the number of files written."""
    location = parse_s3_uri(uri, field)
    fs = filesystem(settings)
    if local.is_file():
        pairs = [(local, location.path)]
    else:
        pairs = [
            (p, location.join(p.relative_to(local).as_posix()).path)
            for p in sorted(local.rglob("*"))
            if p.is_file()
            and p.relative_to(local).parts[0] not in skip
            and not p.name.endswith(".partial")
        ]
    try:
        for path, key in pairs:
            with path.open("rb") as src, fs.open_output_stream(key) as out:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
    except OSError as exc:
        raise ObjectStoreError(explain(exc, field, uri, writing=True)) from exc
    return len(pairs)


def list_prefixes(uri: str, field: str, settings: S3Settings) -> list[str]:
    """The names of the "directories" directly under a prefix (none when it is empty)."""
    from pyarrow.fs import FileSelector, FileType

    location = parse_s3_uri(uri, field)
    fs = filesystem(settings)
    try:
        entries = fs.get_file_info(FileSelector(location.path, allow_not_found=True))
    except OSError as exc:
        raise ObjectStoreError(explain(exc, field, uri)) from exc
    return sorted(e.path.rsplit("/", 1)[-1] for e in entries if e.type == FileType.Directory)


def delete_prefix(uri: str, field: str, settings: S3Settings) -> None:
    location = parse_s3_uri(uri, field)
    try:
        filesystem(settings).delete_dir(location.path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ObjectStoreError(explain(exc, field, uri, writing=True)) from exc


def work_dir(env: Mapping[str, str], prefix: str) -> Path:
    """A fresh directory to stage s3:// files in: under the pod's scratch volume
    (KUBETUNE_WORK_DIR) when it is there, else under the system's temporary directory."""
    import tempfile

    base = env.get(Env.WORK_DIR)
    parent = base if base and Path(base).is_dir() else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


#: What planning reads of a model directory (its config and its tokenizer's files).
PLANNING_MODEL_FILES: Final = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
#: Written into a model directory once every file of it is downloaded.
COMPLETE_MARKER: Final = ".kubetune-complete"


def stage_inputs(
    env: Mapping[str, str],
    work_dir: Path,
    *,
    model_dir: Path | None = None,
    model_files: Collection[str] | None = None,
) -> dict[str, str]:
    """Download every s3:// input of a pod's (or a local run's) environment: each into
    `work_dir/inputs/<role>`, the model into `model_dir` when given (skipped when an
    earlier download completed) and, with `model_files`, only those files of it. Returns
    the input variables to set to the local paths."""
    from kubetune.api.inputs import INPUT_FIELDS
    from kubetune.contract import INPUT_ENV

    settings = S3Settings.from_env(env)
    out: dict[str, str] = {}
    for role, var in INPUT_ENV.items():
        value = env.get(var)
        if value is None or not is_s3(value):
            continue
        field = INPUT_FIELDS[role]
        if role == "model" and model_dir is not None:
            if not (model_dir / COMPLETE_MARKER).exists():
                fetch(value, model_dir, field, settings)
                (model_dir / COMPLETE_MARKER).write_text(value)
            out[var] = str(model_dir)
            continue
        only = model_files if role == "model" else None
        out[var] = str(fetch(value, work_dir / "inputs" / role, field, settings, only=only))
    return out


def stage_output(
    env: Mapping[str, str], work_dir: Path, local: Path | None = None
) -> dict[str, str]:
    """For an s3:// output: the local directory the trainer writes to (OUTPUT_PATH, default
    `work_dir/output`) and the URI it uploads to (OUTPUT_URI), with what an unfinished
    earlier attempt uploaded there (its checkpoints, for the resume) downloaded first; a
    finished one (with its report.json) is not: the run starts afresh and replaces it.
    Nothing for any other output."""
    uri = env.get(Env.OUTPUT_PATH)
    if uri is None or not is_s3(uri):
        return {}
    local = local or work_dir / "output"
    settings = S3Settings.from_env(env)
    location = parse_s3_uri(uri, "spec.output.uri")
    from pyarrow.fs import FileSelector, FileType

    try:
        entries = filesystem(settings).get_file_info(
            FileSelector(location.path, recursive=True, allow_not_found=True)
        )
    except OSError as exc:
        raise ObjectStoreError(explain(exc, "spec.output.uri", uri)) from exc
    names = {e.path[len(location.path) :].lstrip("/") for e in entries if e.type == FileType.File}
    if names and "report.json" not in names:
        fetch(uri, local, "spec.output.uri", settings)
    local.mkdir(parents=True, exist_ok=True)
    return {Env.OUTPUT_PATH: str(local), Env.OUTPUT_URI: uri}
