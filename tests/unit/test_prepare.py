"""The prepare step: the termination message encoding, `run(env)` on real files, and
`main()`'s exit code and termination message for bad inputs."""

from __future__ import annotations

import json
import random
import shutil
import string
from pathlib import Path
from typing import Any

import pytest

from kubetune import prepare
from kubetune.api import FineTuneJobSpec, parse_job
from kubetune.api.plan import PlanDocument
from kubetune.contract import decode_prepare_message
from kubetune.planning import bundled_architectures

pytestmark = pytest.mark.unit

MODEL_URI = "file:///models/qwen2-0.5b"


def make_spec(**extra: Any) -> FineTuneJobSpec:
    spec: dict[str, Any] = {
        "model": {"uri": MODEL_URI},
        "dataset": {"uri": "file:///data/train.jsonl"},
        **extra,
    }
    manifest = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo"},
        "spec": spec,
    }
    return parse_job(manifest).spec


def spec_json(spec: FineTuneJobSpec) -> str:
    return json.dumps(spec.model_dump(by_alias=True, exclude_none=True, mode="json"))


def rows(n: int, start: int = 0) -> str:
    return "".join(
        json.dumps({"prompt": f"Question {i}?", "completion": f" Answer {i}."}) + "\n"
        for i in range(start, start + n)
    )


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    shutil.copy(bundled_architectures()["qwen2-0.5b"], path / "config.json")
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text(rows(20))
    return path


def base_env(model_dir: Path, dataset: Path, **extra: str) -> dict[str, str]:
    return {
        "KUBETUNE_SPEC_JSON": spec_json(make_spec()),
        "KUBETUNE_MODEL_PATH": str(model_dir),
        "KUBETUNE_DATASET_PATH": str(dataset),
        "KUBETUNE_GPU_MEMORY_GIB": "24",
        **extra,
    }


# ---- encode_message ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "result",
    [
        {"plan": {"method": "LoRA", "reasons": ["short"]}},
        {"error": "train.jsonl line 3: not valid JSON", "reason": "DataError"},
        {"plan": {"text": "é" * 100}},
    ],
)
def test_small_message_is_plain_compact_json(result: dict[str, Any]) -> None:
    message = prepare.encode_message(result)
    assert not message.startswith("gz:")
    assert json.loads(message) == result
    assert message == json.dumps(result, separators=(",", ":"), sort_keys=True)
    assert decode_prepare_message(message) == result


def test_message_at_the_limit_stays_plain() -> None:
    overhead = len(json.dumps({"x": ""}, separators=(",", ":")))
    exact = {"x": "a" * (prepare.MAX_MESSAGE - overhead)}
    assert not prepare.encode_message(exact).startswith("gz:")
    over = {"x": "a" * (prepare.MAX_MESSAGE - overhead + 1)}
    assert prepare.encode_message(over).startswith("gz:")


def test_limit_counts_bytes_not_characters() -> None:
    # 2,000 two-byte characters: 2,000 characters but 4,000+ bytes.
    result = {"x": "é" * 2000}
    message = prepare.encode_message(result)
    assert message.startswith("gz:")
    assert decode_prepare_message(message) == result


@pytest.mark.parametrize("size", [4000, 10_000, 20_000])
def test_large_message_is_compressed_and_decodes(size: int) -> None:
    reasons = [f"Reason {i}: the memory estimate says it fits." for i in range(size // 45)]
    result = {"plan": {"method": "Full", "reasons": reasons}}
    assert len(json.dumps(result)) > prepare.MAX_MESSAGE
    message = prepare.encode_message(result)
    assert message.startswith("gz:")
    assert len(message.encode()) <= prepare.MAX_MESSAGE
    assert message.isascii()
    assert decode_prepare_message(message) == result


def test_too_large_message_is_an_error() -> None:
    rng = random.Random(7)
    noise = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(20_000))
    with pytest.raises(ValueError, match="too large for a termination message"):
        prepare.encode_message({"plan": {"noise": noise}})


# ---- run --------------------------------------------------------------------------------------


def test_run_plans_from_files(model_dir: Path, dataset: Path) -> None:
    result = prepare.run(base_env(model_dir, dataset))
    assert set(result) == {"plan"}
    plan = result["plan"]
    assert plan["model"]["name"] == "Qwen/Qwen2-0.5B"
    assert plan["exampleCount"] == 18  # 20 minus the default 10% validation split
    assert plan["datasetFormat"] == "PromptCompletion"
    assert plan["memory"]["gpuMemoryGiB"] == pytest.approx(24.0)
    assert plan["reasons"][0] == "GPU memory 24 GiB as the operator resolved it"
    assert plan["fits"] is True
    # What main() writes (the full plan, or its compact form where that is over the limit,
    # as here: a tiny dataset's plan is just over it) decodes back to the same plan.
    try:
        message = prepare.encode_message(result)
    except ValueError:
        message = prepare.encode_message(
            {"plan": PlanDocument.model_validate(plan).to_compact_json()}
        )
    decoded = PlanDocument.from_compact_json(decode_prepare_message(message)["plan"])
    assert decoded == PlanDocument.model_validate(plan)


def test_run_reads_a_config_json_path_too(model_dir: Path, dataset: Path) -> None:
    env = base_env(model_dir, dataset, KUBETUNE_MODEL_PATH=str(model_dir / "config.json"))
    assert prepare.run(env)["plan"]["model"]["name"] == "Qwen/Qwen2-0.5B"


def test_run_uses_the_validation_file(model_dir: Path, dataset: Path, tmp_path: Path) -> None:
    val = tmp_path / "val.jsonl"
    val.write_text(rows(4, start=100))
    spec = make_spec(dataset={"uri": "file:///data/train.jsonl", "validationUri": "file:///v"})
    env = base_env(
        model_dir, dataset, KUBETUNE_SPEC_JSON=spec_json(spec), KUBETUNE_VALIDATION_PATH=str(val)
    )
    assert prepare.run(env)["plan"]["exampleCount"] == 20


def test_run_follows_the_spec(model_dir: Path, dataset: Path) -> None:
    spec = make_spec(
        method={"type": "Full"},
        resources={"numNodes": 2, "gpusPerNode": 4},
        hyperparameters={"epochs": 2},
    )
    env = base_env(
        model_dir, dataset, KUBETUNE_SPEC_JSON=spec_json(spec), KUBETUNE_GPU_MEMORY_GIB="80"
    )
    plan = prepare.run(env)["plan"]
    assert plan["method"] == "Full"
    assert plan["numNodes"] == 2
    assert plan["gpusPerNode"] == 4
    assert plan["hyperparameters"]["epochs"] == 2
    assert plan["memory"]["gpuMemoryGiB"] == pytest.approx(80.0)


def test_run_plans_a_bundled_hub_model_without_downloading(dataset: Path) -> None:
    spec = make_spec(model={"uri": "hf://Qwen/Qwen2-0.5B"})
    env = {
        "KUBETUNE_SPEC_JSON": spec_json(spec),
        "KUBETUNE_MODEL_PATH": "hf://Qwen/Qwen2-0.5B",
        "KUBETUNE_DATASET_PATH": str(dataset),
    }
    plan = prepare.run(env)["plan"]
    assert plan["model"]["name"] == "Qwen/Qwen2-0.5B"
    assert plan["memory"]["gpuMemoryGiB"] == pytest.approx(80.0)  # the default


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (rows(3) + "{oops\n", r"line 4: not valid JSON"),
        (rows(2) + '{"text": "x"}\n', r"line 3: this row is Text"),
        ("", r"the dataset is empty"),
    ],
)
def test_run_raises_data_errors(model_dir: Path, dataset: Path, data: str, match: str) -> None:
    from kubetune.data import DataError

    dataset.write_text(data)
    with pytest.raises(DataError, match=match):
        prepare.run(base_env(model_dir, dataset))


def test_run_missing_dataset(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dataset file not found"):
        prepare.run(base_env(model_dir, tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="is a directory"):
        prepare.run(base_env(model_dir, tmp_path))


def test_run_plans_from_a_hub_dataset_offline(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Parquet dataset repository laid out in the hub cache (HF_HUB_OFFLINE=1): the split
    and revision of spec.dataset.hub, the validation split for a hub validationUri, and the
    error naming the source and the row."""
    from tests.unit.hubcache import hub_env, parquet_dataset_repo

    parquet_dataset_repo(tmp_path / "hub", "acme/support", rows=30, validation=6)
    spec = make_spec(
        dataset={
            "uri": "hf://datasets/acme/support",
            "validationUri": "hf://datasets/acme/support",
            "columns": {"prompt": "question", "completion": "answer"},
            "hub": {"split": "train", "revision": "main"},
        }
    )
    env = base_env(model_dir, Path("x"), KUBETUNE_SPEC_JSON=spec_json(spec))
    env["KUBETUNE_DATASET_PATH"] = env["KUBETUNE_VALIDATION_PATH"] = "hf://datasets/acme/support"
    with hub_env(monkeypatch, tmp_path / "hub"):
        plan = prepare.run(env)["plan"]
        assert plan["exampleCount"] == 30
        assert plan["datasetFormat"] == "PromptCompletion"
        spec = make_spec(dataset={"uri": "hf://datasets/acme/support"})
        env["KUBETUNE_SPEC_JSON"] = spec_json(spec)
        with pytest.raises(ValueError, match=r"hf://datasets/acme/support \(train\) row 1: "):
            prepare.run(env)
        spec = make_spec(dataset={"uri": "hf://datasets/acme/support", "hub": {"split": "test"}})
        env["KUBETUNE_SPEC_JSON"] = spec_json(spec)
        with pytest.raises(ValueError, match=r"Unknown split \"test\".*spec.dataset.hub"):
            prepare.run(env)


# ---- main -------------------------------------------------------------------------------------


def set_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: Path) -> None:
    for key in (
        "KUBETUNE_VALIDATION_PATH",
        "KUBETUNE_GPU_MEMORY_GIB",
        "KUBETUNE_SPEC_JSON",
        "KUBETUNE_MODEL_PATH",
        "KUBETUNE_DATASET_PATH",
    ):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KUBETUNE_TERMINATION_MESSAGE_PATH", str(message))


def test_main_writes_the_plan(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    model_dir: Path,
    dataset: Path,
    tmp_path: Path,
) -> None:
    message = tmp_path / "termination-log"
    set_env(monkeypatch, base_env(model_dir, dataset), message)
    assert prepare.main() == 0
    written = decode_prepare_message(message.read_text())
    assert written["plan"]["exampleCount"] == 18
    assert "error" not in written
    printed = json.loads(capsys.readouterr().out)
    assert PlanDocument.from_compact_json(written["plan"]) == PlanDocument.model_validate(
        printed["plan"]
    )


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (rows(2) + "not json at all\n", "line 3: not valid JSON"),
        (rows(2) + "[1, 2]\n", "line 3: each line must be a JSON object"),
        (b'{"prompt": "a", "completion": "\xff"}\n', "line 1: not valid UTF-8"),
        (rows(1) * 5, "all 5 examples are the same text"),
    ],
)
def test_main_broken_dataset_exits_with_the_config_error_code(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    model_dir: Path,
    dataset: Path,
    tmp_path: Path,
    data: str | bytes,
    match: str,
) -> None:
    if isinstance(data, bytes):
        dataset.write_bytes(data)
    else:
        dataset.write_text(data)
    message = tmp_path / "termination-log"
    set_env(monkeypatch, base_env(model_dir, dataset), message)
    assert prepare.main() == 78
    written = json.loads(message.read_text())
    assert set(written) == {"error", "reason"}
    assert written["reason"] == "DataError"
    assert written["error"].startswith(str(dataset))
    assert match in written["error"]
    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(captured.err) == written


def test_main_bad_model_config_is_a_model_config_error(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    (model_dir / "config.json").write_text(json.dumps({"hidden_size": 64}))
    message = tmp_path / "termination-log"
    set_env(monkeypatch, base_env(model_dir, dataset), message)
    assert prepare.main() == 78
    written = json.loads(message.read_text())
    assert written["reason"] == "ModelConfigError"
    assert "model_type" in written["error"]


def test_main_missing_environment_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    env = base_env(model_dir, dataset)
    del env["KUBETUNE_DATASET_PATH"]
    message = tmp_path / "termination-log"
    set_env(monkeypatch, env, message)
    assert prepare.main() == 78
    assert "KUBETUNE_DATASET_PATH" in json.loads(message.read_text())["error"]


def test_main_survives_an_unwritable_termination_path(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    dataset.write_text("{broken\n")
    set_env(monkeypatch, base_env(model_dir, dataset), tmp_path / "missing-dir" / "log")
    assert prepare.main() == 78


@pytest.mark.parametrize("content", [None, "{not json"])
def test_main_unreadable_model_config_is_a_model_config_error(
    monkeypatch: pytest.MonkeyPatch,
    model_dir: Path,
    dataset: Path,
    tmp_path: Path,
    content: str | None,
) -> None:
    config = model_dir / "config.json"
    if content is None:
        config.unlink()
    else:
        config.write_text(content)
    message = tmp_path / "termination-log"
    set_env(monkeypatch, base_env(model_dir, dataset), message)
    assert prepare.main() == 78
    assert json.loads(message.read_text())["reason"] == "ModelConfigError"


# ---- the tokenizer ------------------------------------------------------------------------------


def test_a_pvc_model_with_its_tokenizer_is_counted_exactly(model_dir: Path, dataset: Path) -> None:
    from tests.unit.test_data_tokens import WORDS, word_level

    assert prepare.run(base_env(model_dir, dataset))["plan"]["tokenCountEstimated"] is True
    word_level(model_dir, WORDS)
    plan = prepare.run(base_env(model_dir, dataset))["plan"]
    assert plan["tokenCountEstimated"] is False
    assert any(d["key"] == "data.tokens" for d in plan["decisions"])


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_a_hub_model_tokenizer_comes_through_the_hub_cache(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch, with_tokenizer: bool
) -> None:
    """Offline, against the hub cache layout: the config and, where the repository has
    them, the tokenizer files; without them the plan estimates and says so."""
    import importlib

    import huggingface_hub.constants

    from tests.unit.test_data_tokens import WORDS, word_level

    cache = tmp_path / "hub"
    repo = cache / "models--acme--chatty"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    shutil.copy(bundled_architectures()["qwen2-0.5b"], snap / "config.json")
    if with_tokenizer:
        word_level(snap, WORDS)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    importlib.reload(huggingface_hub.constants)
    try:
        plan = prepare.run(base_env(snap, dataset, KUBETUNE_MODEL_PATH="hf://acme/chatty"))["plan"]
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)
    assert plan["tokenCountEstimated"] is (not with_tokenizer)
