"""Every family the planner accepts, trained with every method it plans (issue 17).

For a tiny config of each family (the table's nine and one outside it), saved with its
safetensors weights: the planner's parameter counts equal the built model's, and the
trainer's `apply_method` wraps or freezes the model as planned (LoRA by peft's own rules,
so GPT-2's `Conv1D` blocks are adapted) and one optimizer step changes exactly the
trainable weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest

from kubetune.planning.job import model_arch_with_weights
from kubetune.planning.methods import lora_target_modules
from tests.trainer.conftest import MakeRun

pytestmark = pytest.mark.trainer

METHODS = ("Full", "LoRA", "Prefix", "Partial")

_LLAMA_LIKE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "vocab_size": 96,
}

#: model_type -> tiny config fields (transformers' defaults fill the rest).
TINY: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": {**_LLAMA_LIKE, "tie_word_embeddings": True},
    "qwen3": {**_LLAMA_LIKE, "head_dim": 16},
    "gemma": {**_LLAMA_LIKE, "head_dim": 8},
    "phi3": {**_LLAMA_LIKE, "num_key_value_heads": 4, "pad_token_id": 0},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "vocab_size": 96},
    "gpt_neox": {**_LLAMA_LIKE, "num_key_value_heads": 4},
    "opt": {
        "hidden_size": 32,
        "ffn_dim": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "vocab_size": 96,
        "word_embed_proj_dim": 32,
    },
    # Outside the table, planned from the standard fields and the safetensors headers:
    # Llama-like projections but norms the Llama shapes do not have (OLMo 2: q/k norms,
    # norms after attention and MLP) ...
    "olmo2": _LLAMA_LIKE,
    # ... a plain MLP named c_fc/c_proj, biases everywhere and LayerNorms (StarCoder2) ...
    "starcoder2": {**_LLAMA_LIKE, "use_bias": True},
    # ... and LayerNorms with biases on q/k/v only (StableLM).
    "stablelm": {**_LLAMA_LIKE, "use_qkv_bias": True},
}
OUTSIDE_TABLE = {"olmo2", "starcoder2", "stablelm"}

SPECIAL = {"bos_token_id": 1, "eos_token_id": 2}


def _save_tiny(model_type: str, out: Path) -> tuple[Any, dict[str, Any]]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY[model_type], **SPECIAL)
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model.save_pretrained(out)
    return model, json.loads((out / "config.json").read_text())


def _plan(method: str, config: dict[str, Any], model_dir: Path, data: Path) -> Any:
    from kubetune.api import parse_job
    from kubetune.planning.job import build_plan

    rows = [{"prompt": f"Q{i}: ", "completion": f"A{i}."} for i in range(64)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    spec = parse_job(
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "t"},
            "spec": {
                "model": {"uri": f"file://{model_dir}"},
                "dataset": {"uri": f"file://{data}"},
                "method": {"type": method},
                "resources": {"numNodes": 1, "gpusPerNode": 0},
                "hyperparameters": {"crossValidation": {"mode": "Off"}},
            },
        }
    ).spec
    return build_plan(
        spec, data.read_bytes(), str(data), config, str(model_dir), (8.0, "test"), cpu_processes=1
    )


@pytest.fixture(scope="module", params=sorted(TINY))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    import torch

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp(request.param)
    model, config = _save_tiny(request.param, out)
    return request.param, out, config, sum(p.numel() for p in model.parameters())


def test_the_planner_counts_the_built_model(family: Any, tmp_path: Path) -> None:
    model_type, out, config, built = family
    plan = _plan("Full", config, out, tmp_path / "train.jsonl")
    assert plan.total_parameters == built
    shapes = plan.decision("model.shapes")
    if model_type in OUTSIDE_TABLE:  # the plan says what it read and what it assumed
        assert shapes is not None
        assert "outside kubetune's architecture table" in shapes.sentence
        assert "from the safetensors headers" in shapes.sentence
    else:  # the table's shapes agree with the headers: nothing to say
        assert shapes is None


def test_lora_targets_every_linear_layer_of_the_blocks_by_peft_rules(family: Any) -> None:
    """The planned default targets are what peft's "all-linear" rule selects (every
    nn.Linear and Conv1D but the LM head), family by family."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_type, out, config, _ = family
    arch = model_arch_with_weights(config, str(out))
    wrapped = get_peft_model(
        AutoModelForCausalLM.from_pretrained(out), LoraConfig(target_modules="all-linear")
    )
    targeted = cast(list[str], wrapped.base_model.targeted_module_names)
    names = {n.rsplit(".", 1)[-1] for n in targeted}
    assert set(lora_target_modules(arch)) == names, model_type


def _states(
    p: int, largest: int, stage: int, offload: Any, gpn: int, nodes: int, init: bool
) -> Any:
    from kubetune.planning import deepspeed_comparable_model_states

    return deepspeed_comparable_model_states(p, largest, stage, offload, gpn, nodes, init)


def test_model_states_agree_with_deepspeed_measuring_the_built_model(family: Any) -> None:
    """DeepSpeed's estimators fed by its own measure of the built model (``model_to_params``:
    unique parameters, largest module) against the planner's figures from the config and the
    safetensors headers: within 5% for every layout and offload setting."""
    from transformers import AutoModelForCausalLM

    from kubetune.planning import Offload
    from tests.trainer.test_planning_deepspeed import LAYOUTS, TOLERANCE, _estimator

    model_type, out, config, _ = family
    arch = model_arch_with_weights(config, str(out))
    ours_p, ours_l = arch.total_parameters, arch.largest_layer_parameters
    measure = _estimator("deepspeed.runtime.zero.stage3", "model_to_params")
    ds_p, ds_l = measure(AutoModelForCausalLM.from_pretrained(out))
    zero2 = _estimator(
        "deepspeed.runtime.zero.stage_1_and_2", "estimate_zero2_model_states_mem_needs"
    )
    zero3 = _estimator("deepspeed.runtime.zero.stage3", "estimate_zero3_model_states_mem_needs")
    worst = 0.0
    for gpn, nodes in LAYOUTS:
        for offload in (False, True):
            cpu, gpu = zero2(
                total_params=ds_p,
                num_gpus_per_node=gpn,
                num_nodes=nodes,
                cpu_offload=offload,
                additional_buffer_factor=1.5,
            )
            kind = Offload.OPTIMIZER if offload else Offload.NONE
            ours = _states(ours_p, ours_l, 2, kind, gpn, nodes, True)
            pairs = [(ours.gpu, gpu)] + ([] if offload and nodes > 1 else [(ours.cpu, cpu)])
            worst = max(worst, *(abs(a - b) / b for a, b in pairs))
        for kind in Offload:
            for init in (True, False):
                cpu, gpu, _ = zero3(
                    total_params=ds_p,
                    largest_layer_params=ds_l,
                    num_gpus_per_node=gpn,
                    num_nodes=nodes,
                    cpu_offload=kind is not Offload.NONE,
                    cpu_offload_params=kind is Offload.OPTIMIZER_AND_PARAMETERS,
                    zero_init=init,
                    additional_buffer_factor=1.5,
                )
                ours = _states(ours_p, ours_l, 3, kind, gpn, nodes, init)
                worst = max(worst, abs(ours.gpu - gpu) / gpu, abs(ours.cpu - cpu) / cpu)
    assert worst <= TOLERANCE, (model_type, (ours_p, ds_p), (ours_l, ds_l), worst)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains(family: Any, method: str, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.model import apply_method, count_parameters

    model_type, out, config, _ = family
    plan = _plan(method, config, out, tmp_path / "train.jsonl")
    assert plan.method == method
    model = apply_method(AutoModelForCausalLM.from_pretrained(out), plan)
    trainable, _ = count_parameters(model)
    assert trainable == plan.trainable_parameters, (model_type, method)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 96, (2, 12))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert changed, (model_type, method)
    assert not changed & frozen


def test_lora_with_targets_the_model_lacks_names_what_peft_finds() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kubetune.trainer.config import TrainerConfigError
    from kubetune.trainer.model import apply_method
    from tests.plans import plan_document

    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", **TINY["gpt2"], **SPECIAL)
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    plan = plan_document(
        method="LoRA",
        hyperparameters={
            "loraRank": 4,
            "loraAlpha": 8,
            "loraDropout": 0.0,
            "loraTargetModules": ["q_proj", "v_proj"],
        },
    )
    with pytest.raises(TrainerConfigError) as err:
        apply_method(model, plan)
    message = str(err.value)
    assert "['q_proj', 'v_proj']" in message
    assert "all-linear rule finds ['c_attn', 'c_fc', 'c_proj']" in message
    assert "spec.method.lora.targetModules" in message


def test_method_auto_trains_a_gpt2_architecture_end_to_end(
    make_run: MakeRun, tiny_model: Path, tmp_path: Path
) -> None:
    """Issue 17: `method: Auto` on a GPT-2-architecture model (Conv1D blocks) stopped with
    exit 78 because LoRA found none of its targets. A tiny GPT-2 with the tiny Llama's
    tokenizer, through the real trainer process."""
    import shutil
    import subprocess

    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    model_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model / name).exists():
            shutil.copy(tiny_model / name, model_dir / name)
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    ).save_pretrained(model_dir)
    run = make_run(
        method="Auto",
        model=model_dir,
        rows=48,
        hp={"epochs": 1, "evalSteps": 3, "microBatchSize": 8, "gradientAccumulationSteps": 1},
    )
    assert run.plan["method"] == "LoRA"
    assert run.plan["hyperparameters"]["loraTargetModules"] == ["c_attn", "c_proj", "c_fc"]
    result = subprocess.run(run.command, env=run.env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert run.termination()["progress"]["percentage"] == 100.0
    # Auto kept LoRA (the random base finds the data no more surprising than general text)
    # and adapted the Conv1D blocks.
    adapter = json.loads((run.output / "final" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["c_attn", "c_fc", "c_proj"]
    # The Conv1D adapter merges into the base weights and gives the adapted model's outputs.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.merge import merge_adapter

    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), str(run.output / "final")
    )
    merged: Any = AutoModelForCausalLM.from_pretrained(str(merge_adapter(run.output)))
    adapted.eval()
    merged.eval()
    ids = torch.tensor([[1, 5, 9, 12, 20]])
    with torch.no_grad():
        assert torch.allclose(
            adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4
        )
