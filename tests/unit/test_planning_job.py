"""Planning a FineTuneJob from its inputs: GPU memory from the spec or the nodes, the bundled
model configs, the spec -> PlanRequest mapping, and the whole plan from JSONL texts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import FineTuneJobSpec
from kubetune.data import DataError
from kubetune.planning import Method, ModelConfigError, Offload, bundled_architectures
from kubetune.planning.job import (
    CPU_PROCESS_MEMORY_GIB,
    build_plan,
    gpu_memory_from_nodes,
    known_model_config,
    plan_request,
    resolve_gpu_memory,
)
from tests.unit.specs import spec_from

pytestmark = pytest.mark.unit

BASE_SPEC: dict[str, Any] = {
    "model": {"uri": "hf://Qwen/Qwen2-0.5B"},
    "dataset": {"uri": "file:///data/train.jsonl"},
}


def make_spec(**extra: Any) -> FineTuneJobSpec:
    return spec_from(BASE_SPEC, "demo", "ns", **extra)


def node(name: str, mib: str | None, gpus: str | None = "8", **labels: str) -> dict[str, Any]:
    all_labels = dict(labels)
    if mib is not None:
        all_labels["nvidia.com/gpu.memory"] = mib
    status: dict[str, Any] = {"allocatable": {"cpu": "64"}}
    if gpus is not None:
        status["allocatable"]["nvidia.com/gpu"] = gpus
    return {"metadata": {"name": name, "labels": all_labels}, "status": status}


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def pc_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"prompt": f"Question {i}?", "completion": f" Answer number {i} is here."}
        for i in range(start, start + n)
    ]


QWEN = known_model_config("hf://Qwen/Qwen2-0.5B")
GPU = (24.0, "GPU memory 24 GiB from a test")


# ---- gpu_memory_from_nodes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "selector", "gpus", "expected"),
    [
        ([], {}, 1, None),
        ([node("a", "81920")], {}, 1, 80.0),
        ([node("a", "40960")], {}, 8, 40.0),
        ([node("a", "81559")], {}, 1, 81559 / 1024),
        # The smallest matching node decides.
        ([node("a", "81920"), node("b", "24576"), node("c", "49152")], {}, 1, 24.0),
        # Nodes without enough GPUs are left out.
        ([node("a", "81920", gpus="8"), node("b", "24576", gpus="2")], {}, 4, 80.0),
        ([node("a", "81920", gpus="2")], {}, 4, None),
        ([node("a", "81920", gpus=None)], {}, 1, None),
        ([node("a", "81920", gpus="0")], {}, 1, None),
        # gpusPerNode 0 needs no GPU on the node.
        ([node("a", "16384", gpus=None)], {}, 0, 16.0),
        # The node selector filters.
        (
            [
                node("a", "81920", pool="h100"),
                node("b", "24576", pool="l4"),
                node("c", "40960"),
            ],
            {"pool": "h100"},
            1,
            80.0,
        ),
        ([node("a", "81920", pool="h100")], {"pool": "a100"}, 1, None),
        (
            [node("a", "81920", pool="h100", zone="x"), node("b", "40960", pool="h100", zone="y")],
            {"pool": "h100", "zone": "y"},
            1,
            40.0,
        ),
        # Missing or malformed labels are ignored.
        ([node("a", None), node("b", "32768")], {}, 1, 32.0),
        ([node("a", "80Gi"), node("b", "")], {}, 1, None),
        ([{"metadata": {}, "status": {}}], {}, 0, None),
    ],
)
def test_gpu_memory_from_nodes(
    nodes: list[dict[str, Any]], selector: dict[str, str], gpus: int, expected: float | None
) -> None:
    got = gpu_memory_from_nodes(nodes, selector, gpus)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


# ---- resolve_gpu_memory -----------------------------------------------------------------------

NODES = [node("a", "81920", pool="h100"), node("b", "24576", pool="l4")]


@pytest.mark.parametrize(
    ("extra", "nodes", "gib", "says"),
    [
        ({"resources": {"gpuMemoryGiB": 40}}, NODES, 40.0, "from spec.resources.gpuMemoryGiB"),
        ({"resources": {"gpuMemoryGiB": 15.5}}, [], 15.5, "15.5 GiB from spec"),
        ({}, NODES, 24.0, "nvidia.com/gpu.memory label of the smallest matching node"),
        ({"nodeSelector": {"pool": "h100"}}, NODES, 80.0, "80.0 GiB from the nvidia.com"),
        ({"nodeSelector": {"pool": "none"}}, NODES, 72.0, "72 GiB assumed"),
        ({}, [], 72.0, "no spec.resources.gpuMemoryGiB"),
        ({}, None, 72.0, "assumed"),
        (
            {"resources": {"gpusPerNode": 0, "gpuMemoryGiB": 40}},
            NODES,
            CPU_PROCESS_MEMORY_GIB,
            "gpusPerNode is 0",
        ),
        ({"resources": {"gpusPerNode": 0}}, [], CPU_PROCESS_MEMORY_GIB, "host memory"),
    ],
)
def test_resolve_gpu_memory(
    extra: dict[str, Any], nodes: list[dict[str, Any]] | None, gib: float, says: str
) -> None:
    value, reason = resolve_gpu_memory(make_spec(**extra), nodes, 72.0)
    assert value == pytest.approx(gib)
    assert says in reason


def test_resolve_gpu_memory_needs_nodes_with_enough_gpus() -> None:
    nodes = [node("big", "81920", gpus="8"), node("small", "24576", gpus="1")]
    assert resolve_gpu_memory(make_spec(), nodes, 50.0)[0] == pytest.approx(24.0)
    eight = make_spec(resources={"gpusPerNode": 8})
    assert resolve_gpu_memory(eight, nodes, 50.0)[0] == pytest.approx(80.0)


# ---- known_model_config -----------------------------------------------------------------------


def _bundled_ids() -> list[tuple[str, str]]:
    out = []
    for stem, path in bundled_architectures().items():
        name = json.loads(path.read_text()).get("_name_or_path")
        if name:
            out.append((stem, str(name)))
    return out


@pytest.mark.parametrize(("stem", "hub_id"), _bundled_ids())
def test_every_bundled_config_is_known_by_its_hub_id(stem: str, hub_id: str) -> None:
    expected = json.loads(bundled_architectures()[stem].read_text())
    assert known_model_config(f"hf://{hub_id}") == expected
    assert known_model_config(f"hf://{hub_id.lower()}") == expected
    assert known_model_config(f"hf://{hub_id.upper()}") == expected


def test_bundled_catalogue_is_not_empty() -> None:
    ids = dict(_bundled_ids())
    assert len(ids) >= 10
    assert ids["qwen2-0.5b"] == "Qwen/Qwen2-0.5B"


@pytest.mark.parametrize(
    "uri",
    [
        "hf://someone/unknown-model",
        "hf://Qwen/Qwen2-0.5B-Instruct",
        "hf://Qwen",
        "pvc://models/Qwen/Qwen2-0.5B",
        "file:///Qwen/Qwen2-0.5B",
        "configmap://qwen/config.json",
        "Qwen/Qwen2-0.5B",
    ],
)
def test_unknown_or_non_hub_models_have_no_bundled_config(uri: str) -> None:
    assert known_model_config(uri) is None


def test_known_model_config_is_a_fresh_copy() -> None:
    first = known_model_config("hf://Qwen/Qwen2-0.5B")
    assert first is not None
    first["hidden_size"] = -1
    second = known_model_config("hf://Qwen/Qwen2-0.5B")
    assert second is not None
    assert second["hidden_size"] != -1


# ---- plan_request -----------------------------------------------------------------------------


def test_plan_request_defaults_leave_everything_to_the_planner() -> None:
    req = plan_request(make_spec())
    assert req.method is None
    assert req.zero_stage is None
    assert req.offload is None
    assert req.micro_batch_size is None
    assert req.epochs is None
    assert req.learning_rate is None
    assert req.lora_rank is None
    assert req.max_seq_length is None
    assert req.incremental is False


def test_plan_request_maps_every_setting() -> None:
    spec = make_spec(
        dataset={"maxSeqLength": 2048},
        method={"type": "LoRA", "lora": {"rank": 32}},
        hyperparameters={
            "learningRate": 1e-4,
            "epochs": 3,
            "microBatchSize": 4,
            "incremental": True,
        },
        resources={"gpusPerNode": 8},
        deepspeed={"zeroStage": 3, "offload": "Optimizer"},
    )
    req = plan_request(spec)
    assert req.method is Method.LORA
    assert req.lora_rank == 32
    assert req.zero_stage == 3
    assert req.offload is Offload.OPTIMIZER
    assert req.micro_batch_size == 4
    assert req.epochs == 3
    assert req.learning_rate == pytest.approx(1e-4)
    assert req.max_seq_length == 2048
    assert req.incremental is True


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("Auto", None),
        ("Full", Method.FULL),
        ("Partial", Method.PARTIAL),
        ("LoRA", Method.LORA),
        ("Prefix", Method.PREFIX),
    ],
)
def test_plan_request_method(method: str, expected: Method | None) -> None:
    assert plan_request(make_spec(method={"type": method})).method == expected


@pytest.mark.parametrize(("epochs", "expected"), [(1, 1), (0.2, 1), (2.6, 3), (3.4, 3), (100, 100)])
def test_plan_request_whole_epochs(epochs: float, expected: int) -> None:
    spec = make_spec(hyperparameters={"epochs": epochs})
    assert plan_request(spec).epochs == expected


@pytest.mark.parametrize(
    ("zero", "offload", "stage", "off"),
    [
        ("Auto", "Auto", None, None),
        (0, "None", 0, Offload.NONE),
        (2, "Auto", 2, None),
        (3, "OptimizerAndParameters", 3, Offload.OPTIMIZER_AND_PARAMETERS),
    ],
)
def test_plan_request_deepspeed(
    zero: int | str, offload: str, stage: int | None, off: Offload | None
) -> None:
    req = plan_request(make_spec(deepspeed={"zeroStage": zero, "offload": offload}))
    assert req.zero_stage == stage
    assert req.offload == off


def test_plan_request_accepts_every_admitted_micro_batch_size() -> None:
    spec = make_spec(hyperparameters={"microBatchSize": 128})
    plan_request(spec)


# ---- build_plan -------------------------------------------------------------------------------


def test_build_plan_shape() -> None:
    assert QWEN is not None
    plan = build_plan(
        make_spec(dataset={"validationSplit": 0.2}),
        jsonl(pc_rows(10)),
        "train.jsonl",
        QWEN,
        "hf://Qwen/Qwen2-0.5B",
        GPU,
    ).to_json()
    for key in ("method", "fits", "memory", "hyperparameters", "reasons", "warnings"):
        assert key in plan, key
    assert plan["reasons"][0] == GPU[1]
    assert plan["method"] in {"Full", "Partial", "LoRA", "Prefix"}
    assert plan["fits"] is True
    assert plan["memory"]["gpuMemoryGiB"] == pytest.approx(24.0)
    assert plan["datasetFormat"] == "PromptCompletion"
    assert plan["exampleCount"] == 8  # 10 minus the 20% validation split
    assert plan["model"]["name"] == "Qwen/Qwen2-0.5B"
    assert plan["tokenCountEstimated"] is True
    assert isinstance(plan["hyperparameters"]["learningRate"], float)
    json.dumps(plan)


@pytest.mark.parametrize(
    ("rows", "split", "count"),
    [(10, 0.1, 9), (10, 0.2, 8), (10, 0.5, 5), (100, 0.25, 75), (1, 0.1, 1), (3, 0.1, 2)],
)
def test_validation_split_reduces_the_example_count(rows: int, split: float, count: int) -> None:
    assert QWEN is not None
    spec = make_spec(dataset={"validationSplit": split})
    plan = build_plan(spec, jsonl(pc_rows(rows)), "t", QWEN, "q", GPU).to_json()
    assert plan["exampleCount"] == count


def test_validation_text_is_used_instead_of_the_split() -> None:
    assert QWEN is not None
    spec = make_spec(dataset={"validationUri": "file:///data/val.jsonl", "validationSplit": 0.5})
    plan = build_plan(
        spec,
        jsonl(pc_rows(10)),
        "train.jsonl",
        QWEN,
        "q",
        GPU,
        validation_text=jsonl(pc_rows(3, start=100)),
        validation_source="val.jsonl",
    ).to_json()
    assert plan["exampleCount"] == 10


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 14, 15, 16, 25, 300])
@pytest.mark.parametrize("split", [0.01, 0.1, 0.2, 0.5])
def test_the_plan_counts_the_examples_the_trainer_trains_on(n: int, split: float) -> None:
    """The planner and the trainer hold out the same number (`holdout_count`): at least one
    example of two or more, never all; before, a set of 2-4 examples was planned with none
    held out while the trainer held one out."""
    from kubetune.data import holdout_count, parse_jsonl
    from kubetune.trainer.data import split_holdout

    assert QWEN is not None
    text = jsonl(pc_rows(n))
    plan = build_plan(
        make_spec(dataset={"validationSplit": split}), text, "t", QWEN, "q", GPU
    ).to_json()
    train, held_out = split_holdout(parse_jsonl(text, "t", None)[1], split, seed=7)
    assert plan["exampleCount"] == len(train) == n - holdout_count(n, split)
    assert len(held_out) == holdout_count(n, split)
    assert (len(held_out) >= 1) is (n >= 2)
    assert len(train) >= 1


def test_token_count_shrinks_with_the_split() -> None:
    assert QWEN is not None
    text = jsonl(pc_rows(20))
    whole = build_plan(make_spec(), text, "t", QWEN, "q", GPU, jsonl(pc_rows(2, 50)), "v").to_json()
    half = build_plan(
        make_spec(dataset={"validationSplit": 0.5}), text, "t", QWEN, "q", GPU
    ).to_json()
    assert half["tokenCount"] < whole["tokenCount"]
    assert half["tokenCount"] >= half["exampleCount"]


@pytest.mark.parametrize(
    ("rows", "fmt"),
    [
        ([{"text": f"Some document number {i}."} for i in range(5)], "Text"),
        (pc_rows(5), "PromptCompletion"),
        (
            [
                {
                    "messages": [
                        {"role": "user", "content": f"hi {i}"},
                        {"role": "assistant", "content": f"hello {i}"},
                    ]
                }
                for i in range(5)
            ],
            "Chat",
        ),
    ],
)
def test_build_plan_reports_the_detected_format(rows: list[dict[str, Any]], fmt: str) -> None:
    assert QWEN is not None
    plan = build_plan(make_spec(), jsonl(rows), "t", QWEN, "q", GPU).to_json()
    assert plan["datasetFormat"] == fmt


def test_build_plan_forced_format_must_match() -> None:
    assert QWEN is not None
    spec = make_spec(dataset={"format": "Chat"})
    with pytest.raises(DataError, match=r"train\.jsonl line 1: .*PromptCompletion.*Chat"):
        build_plan(spec, jsonl(pc_rows(3)), "train.jsonl", QWEN, "q", GPU).to_json()


@pytest.mark.parametrize(
    ("train", "validation", "match"),
    [
        (jsonl(pc_rows(2)) + "{broken\n", None, r"^train\.jsonl line 3: not valid JSON"),
        ("\n\n", None, r"^train\.jsonl: the dataset is empty"),
        (jsonl(pc_rows(2)), jsonl(pc_rows(1, 9)) + "[1]\n", r"^val\.jsonl line 2: .*JSON object"),
        # The validation file must have the training file's format.
        (jsonl(pc_rows(3)), jsonl([{"text": "doc"}]), r"^val\.jsonl line 1: .*Text"),
        (jsonl(pc_rows(3)), jsonl(pc_rows(3)), r"^train\.jsonl: every validation example"),
        (jsonl([pc_rows(1)[0]] * 4), None, r"^train\.jsonl: all 4 examples are the same"),
        (b'{"text": "ok"}\n{"text": "\xff"}\n', None, r"^train\.jsonl line 2: not valid UTF-8"),
    ],
)
def test_build_plan_data_errors_name_source_and_line(
    train: str | bytes, validation: str | None, match: str
) -> None:
    assert QWEN is not None
    with pytest.raises(DataError, match=match):
        build_plan(
            make_spec(), train, "train.jsonl", QWEN, "q", GPU, validation, "val.jsonl"
        ).to_json()


def test_build_plan_passes_data_problems_on_as_warnings() -> None:
    assert QWEN is not None
    rows = pc_rows(10) + pc_rows(2)  # two duplicates
    # Removed by default (spec.dataset.deduplicate), with a decision that names them.
    plan = build_plan(make_spec(), jsonl(rows), "t", QWEN, "q", GPU).to_json()
    assert not any("duplicate" in w for w in plan["warnings"])
    [found] = [d for d in plan["decisions"] if d["key"] == "data.duplicates"]
    assert "2 exact (removed)" in found["sentence"]
    assert "t line 11 = line 1" in found["sentence"]
    kept = make_spec(dataset={"uri": "file:///t.jsonl", "deduplicate": {"exact": False}})
    plan = build_plan(kept, jsonl(rows), "t", QWEN, "q", GPU).to_json()
    assert any("duplicate training examples kept" in w for w in plan["warnings"])
    clean = build_plan(make_spec(), jsonl(pc_rows(12)), "t", QWEN, "q", GPU).to_json()
    assert not any("duplicate" in w for w in clean["warnings"])
    assert "No duplicates or leakage found." in clean["reasons"][1]


def test_build_plan_uses_the_spec_and_resources() -> None:
    assert QWEN is not None
    spec = make_spec(
        method={"type": "Full"},
        resources={"numNodes": 2, "gpusPerNode": 4},
        hyperparameters={"epochs": 2, "learningRate": 3e-5},
    )
    plan = build_plan(
        spec, jsonl(pc_rows(40)), "t", QWEN, "q", (80.0, "GPU memory 80 GiB")
    ).to_json()
    assert plan["method"] == "Full"
    assert plan["numNodes"] == 2
    assert plan["gpusPerNode"] == 4
    assert plan["hyperparameters"]["epochs"] == 2
    assert plan["hyperparameters"]["learningRate"] == pytest.approx(3e-5)


def test_build_plan_on_cpu() -> None:
    assert QWEN is not None
    spec = make_spec(resources={"gpusPerNode": 0})
    gpu = resolve_gpu_memory(spec, [], 80.0)
    plan = build_plan(spec, jsonl(pc_rows(10)), "t", QWEN, "q", gpu).to_json()
    assert plan["gpusPerNode"] == 1  # one CPU process
    assert plan["reasons"][0].startswith("gpusPerNode is 0")
    assert plan["memory"]["gpuMemoryGiB"] == pytest.approx(CPU_PROCESS_MEMORY_GIB)


def test_build_plan_rejects_a_bad_model_config() -> None:
    from kubetune.planning import ModelConfigError

    with pytest.raises(ModelConfigError, match="model_type"):
        build_plan(
            make_spec(), jsonl(pc_rows(3)), "t", {"hidden_size": 8}, "cfg.json", GPU
        ).to_json()


def test_offload_without_a_zero_stage_is_an_invalid_spec_naming_the_fields() -> None:
    from kubetune.planning.job import PlanRequestError

    spec = make_spec(deepspeed={"zeroStage": 0, "offload": "Optimizer"})
    with pytest.raises(PlanRequestError, match=r"spec\.deepspeed"):
        plan_request(spec)


def test_hyperparameters_the_planner_does_not_take_are_applied_with_a_reason() -> None:
    spec = make_spec(
        hyperparameters={
            "gradientAccumulationSteps": 4,
            "warmupRatio": 0.1,
            "weightDecay": 0.03,
            "maxGradNorm": 0.5,
            "evalSteps": 3,
        }
    )
    text = "\n".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(200))
    config = json.loads(bundled_architectures()["gpt2"].read_text())
    plan = build_plan(spec, text, "t.jsonl", config, "gpt2", (80.0, "r")).to_json()
    hp = plan["hyperparameters"]
    assert hp["gradientAccumulationSteps"] == 4
    assert hp["weightDecay"] == 0.03
    assert hp["maxGradNorm"] == 0.5
    assert hp["evalSteps"] == 3
    assert hp["warmupSteps"] == round(0.1 * hp["totalSteps"])
    assert hp["effectiveBatchSize"] == hp["microBatchSize"] * 4
    assert any(
        r.startswith("Set by spec.hyperparameters: gradient accumulation 4")
        for r in plan["reasons"]
    )


def test_a_family_outside_the_table_is_planned_from_its_safetensors_headers(
    tmp_path: Path,
) -> None:
    """The whole plan for a model_type kubetune has no table entry for, in a local model
    directory: the count and the LoRA targets are the headers', and the model.shapes
    decision says what was read and what assumed."""
    from tests.unit.test_planning_model import OUTSIDE, _olmo_like_block, _safetensors

    config = {**OUTSIDE, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = {
        "model.embed_tokens.weight": [100, 64],
        "model.norm.weight": [64],
        "lm_head.weight": [100, 64],
        **_olmo_like_block(0),
        **_olmo_like_block(1),
    }
    _safetensors(tmp_path / "model.safetensors", tensors)
    spec = make_spec(method={"type": "LoRA"})
    plan = build_plan(spec, jsonl(pc_rows(20)), "t", config, f"file://{tmp_path}", GPU)
    assert plan.total_parameters == sum(math.prod(shape) for shape in tensors.values())
    targets = plan.hyperparameters.lora_target_modules
    assert targets is not None
    assert sorted(targets) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    shapes = plan.decision("model.shapes")
    assert shapes is not None
    assert "'newfamily' is outside kubetune's architecture table" in shapes.sentence
    assert "7 linear layers (the LoRA targets) from the safetensors headers" in shapes.sentence
    keys = [d.key for d in plan.decisions]
    assert keys.index("model.shapes") == keys.index("gpuMemory") + 1
    # Without the weights (a hub source): the same family on Llama-like assumptions, said so.
    hub = build_plan(spec, jsonl(pc_rows(20)), "t", config, "hf://org/new", GPU)
    hub_shapes = hub.decision("model.shapes")
    assert hub_shapes is not None
    assert "no safetensors headers were read" in hub_shapes.sentence
    # A bad header stops planning naming the model source and the file.
    (tmp_path / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00[]")
    with pytest.raises(ModelConfigError, match=r"file://.*model\.safetensors.*not a JSON object"):
        build_plan(spec, jsonl(pc_rows(20)), "t", config, f"file://{tmp_path}", GPU)


def test_a_large_auto_plan_of_a_family_outside_the_table_fits_the_prepare_message(
    tmp_path: Path,
) -> None:
    """The model.shapes decision travels in the prepare pod's termination message with the
    rest of the plan: a 2 x 8 GPU Auto plan of a 7B model outside the table (its alternative
    included) still fits and reads back."""
    from kubetune.api.plan import PlanDocument
    from kubetune.contract import TERMINATION_LIMIT_BYTES, decode_prepare_message
    from kubetune.prepare import encode_message
    from tests.unit.test_planning_model import _safetensors

    config = json.loads(bundled_architectures()["llama-2-7b"].read_text())
    config["model_type"] = "a_family_with_a_long_name"
    h, inner, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    tensors = {"model.embed_tokens.weight": [vocab, h], "model.norm.weight": [h]}
    tensors["lm_head.weight"] = [vocab, h]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({p + f"self_attn.{n}.weight": [h, h] for n in ("q_proj", "k_proj")})
        tensors.update({p + f"self_attn.{n}.weight": [h, h] for n in ("v_proj", "o_proj")})
        tensors.update({p + f"mlp.{n}.weight": [inner, h] for n in ("gate_proj", "up_proj")})
        tensors[p + "mlp.down_proj.weight"] = [h, inner]
        tensors.update(
            {p + f"{n}.weight": [h] for n in ("input_layernorm", "post_attention_layernorm")}
        )
    _safetensors(tmp_path / "model.safetensors", tensors)
    spec = make_spec(resources={"gpusPerNode": 8, "numNodes": 2})
    rows = [
        {"prompt": f"What is herb {i}?", "completion": f" Herb {i}: a plant."} for i in range(200)
    ]
    plan = build_plan(spec, jsonl(rows), "t", config, str(tmp_path), (80.0, "given"))
    assert plan.alternative is not None
    assert plan.decision("model.shapes") is not None
    message = encode_message({"plan": plan.to_compact_json()})
    assert len(message.encode()) <= TERMINATION_LIMIT_BYTES
    assert PlanDocument.from_compact_json(decode_prepare_message(message)["plan"]) == plan


def test_a_cpu_plan_counts_the_specs_processes_per_node_as_ranks() -> None:
    spec = make_spec(resources={"numNodes": 2, "gpusPerNode": 0, "processesPerNode": 2})
    config = known_model_config("hf://Qwen/Qwen2-0.5B")
    assert config is not None
    data = jsonl(pc_rows(40)).encode()
    memory = resolve_gpu_memory(spec, None, 80.0)
    plan = build_plan(spec, data, "/d/t.jsonl", config, "hf://Qwen/Qwen2-0.5B", memory)
    assert (plan.num_nodes, plan.gpus_per_node) == (2, 2)
    # A local run's --nproc wins over the spec.
    one = build_plan(
        spec, data, "/d/t.jsonl", config, "hf://Qwen/Qwen2-0.5B", memory, cpu_processes=1
    )
    assert one.gpus_per_node == 1
