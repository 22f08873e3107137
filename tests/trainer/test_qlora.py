"""QLoRA and DoRA on the CPU: a 4-bit NF4 base (bitsandbytes' CPU path) with LoRA, and DoRA
adapters, train (the loss falls), save an adapter, load it back and merge it into the
full-precision base; the diagnostics probe the quantised model; two processes train QLoRA
with plain data parallelism (no DeepSpeed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.conftest import MakeRun, Run
from tests.trainer.test_trainer import FAST_LORA, _assert_learned, _train

pytestmark = pytest.mark.trainer

pytest.importorskip("bitsandbytes")

IDS = [[1, 5, 9, 12, 20, 31, 7, 3]]


def _probe_spec() -> dict[str, Any]:
    return {"diagnostics": {"memorizationSamples": 8, "prefixTokens": 4, "maxOverhead": 0.5}}


def _quantised_base(path: str, dtype: Any = None) -> Any:
    """The base in 4 bits as the trainer loads it on the CPU (its other parameters in
    `dtype`, default the checkpoint's)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map={"": "cpu"}, dtype=dtype
    )


def _logits(model: Any) -> Any:
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits


def _loss(model: Any, run: Run) -> float:
    """The mean loss on the completion tokens of the first training rows, as trained."""
    import torch
    from transformers import AutoTokenizer

    from kubetune.trainer.data import TokenizedDataset, read_examples

    tok = AutoTokenizer.from_pretrained(run.env["KUBETUNE_MODEL_PATH"])
    _, examples = read_examples(run.env["KUBETUNE_DATASET_PATH"], None)
    rows = TokenizedDataset(examples[:16], tok, 128)
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(len(rows)):
            row = rows[i]
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            losses.append(float(model(input_ids=ids, labels=labels).loss))
    return sum(losses) / len(losses)


def _probed(run: Run) -> None:
    """The diagnostics ran on the quantised model: base figures and probes at evaluations."""
    report = json.loads((run.output / "report.json").read_text())
    assert report["history"][0]["phase"] == "base"
    assert report["history"][0]["general_perplexity_base"] > 1
    probed = [r for r in report["history"] if "memorization_rate_train" in r]
    assert probed, "no evaluation ran the memorisation probe"


def test_qlora_trains_saves_loads_and_merges_into_the_full_precision_base(
    make_run: MakeRun,
) -> None:
    run = make_run(method="QLoRA", hp=FAST_LORA, spec_extra=_probe_spec())
    hp = run.plan["hyperparameters"]
    assert run.plan["method"] == "QLoRA"
    assert (hp["quantType"], hp["doubleQuant"], hp["computeDtype"]) == ("nf4", True, "float32")
    _train(run)
    _assert_learned(run)
    _probed(run)
    # The 4-bit base counted at its real size (bitsandbytes packs two weights a byte), as
    # the plan counts it, plus the adapters.
    counted = json.loads((run.output / "report.json").read_text())["summary"]
    planned = run.plan["totalParameters"] + counted["trainableParameters"]
    assert counted["totalParameters"] == planned, counted
    final = run.output / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["use_dora"] is False
    assert (final / "adapter_model.safetensors").exists()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.merge import merge_adapter

    base_path = run.env["KUBETUNE_MODEL_PATH"]
    # Loaded back as it trained: the adapter on the 4-bit base.
    qlora = PeftModel.from_pretrained(_quantised_base(base_path), str(final))
    assert any(type(m).__name__ == "Linear4bit" for m in qlora.modules())
    # Merged into the full-precision base, not into the 4-bit weights.
    merged: Any = AutoModelForCausalLM.from_pretrained(str(merge_adapter(run.output)))
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    assert next(merged.parameters()).dtype.is_floating_point
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(final))
    import torch

    # The merge is exact against the adapter on the full-precision base ...
    assert torch.allclose(_logits(full), _logits(merged), atol=1e-4)
    # ... and within the 4-bit rounding of the model that trained: the same next tokens
    # almost everywhere and a loss on the training rows within 10%.
    agree = (_logits(qlora).argmax(-1) == _logits(merged).argmax(-1)).float().mean()
    assert agree >= 0.75, f"merged and QLoRA models agree on {agree:.0%} of next tokens"
    trained, merged_loss = _loss(qlora, run), _loss(merged, run)
    assert merged_loss == pytest.approx(trained, rel=0.10)
    assert merged_loss < 0.8 * _loss(AutoModelForCausalLM.from_pretrained(base_path), run)


@pytest.mark.parametrize("method", ["LoRA", "QLoRA"])
def test_dora_trains_saves_loads_and_merges(make_run: MakeRun, method: str) -> None:
    run = make_run(method=method, hp=FAST_LORA, lora={"useDora": True})
    assert run.plan["hyperparameters"]["loraUseDora"] is True
    _train(run)
    _assert_learned(run)
    final = run.output / "final"
    assert json.loads((final / "adapter_config.json").read_text())["use_dora"] is True

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.merge import merge_adapter

    base_path = run.env["KUBETUNE_MODEL_PATH"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(final))
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    merged: Any = AutoModelForCausalLM.from_pretrained(str(merge_adapter(run.output)))
    import torch

    assert torch.allclose(_logits(model), _logits(merged), atol=1e-4)


def test_two_process_qlora_trains_with_plain_data_parallelism(make_run: MakeRun) -> None:
    # Two processes double the batch and halve the steps: train twice the epochs.
    run = make_run(method="QLoRA", nproc=2, hp={**FAST_LORA, "epochs": 10})
    assert run.plan["zeroStage"] == 0
    assert run.plan["gpusPerNode"] == 2
    _train(run)
    _assert_learned(run)
    assert (run.output / "final" / "adapter_model.safetensors").exists()


def test_an_incremental_qlora_run_continues_the_previous_adapter_on_the_4_bit_base(
    tiny_model: Path, tmp_path: Path
) -> None:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.config import TrainerConfigError
    from kubetune.trainer.model import apply_method
    from tests.plans import plan_document

    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.fill_(0.05)
    lora.save_pretrained(str(tmp_path / "prev" / "final"))
    plan = plan_document(method="QLoRA", remedies={"from": f"file://{tmp_path / 'prev'}"})
    base = _quantised_base(str(tiny_model), dtype=torch.bfloat16)
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    model = apply_method(base, plan)
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b
    assert all(p.requires_grad and torch.all(p == 0.05) for p in b)
    # prepare_model_for_kbit_training ran: what is not 4-bit is fp32 and frozen.
    embed = model.get_input_embeddings().weight
    assert embed.dtype == torch.float32
    assert not embed.requires_grad
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    # Full weights would load unquantised: refused, naming the field.
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(tmp_path / "full" / "final")
    plan = plan_document(method="QLoRA", remedies={"from": str(tmp_path / "full")})
    with pytest.raises(TrainerConfigError, match=r"spec\.model\.from: QLoRA continues"):
        apply_method(_quantised_base(str(tiny_model)), plan)


QUANTISED = {"quantType": "nf4", "doubleQuant": True, "computeDtype": "bfloat16"}


def test_the_trainer_builds_the_planned_4_bit_config_or_refuses_naming_the_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from kubetune.trainer import model
    from kubetune.trainer.config import TrainerConfigError
    from tests.plans import plan_document

    plan = plan_document(method="QLoRA", hyperparameters=QUANTISED)
    config = model.quantization_config(plan, cuda=False)
    assert config.load_in_4bit
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_compute_dtype == torch.bfloat16  # the plan's, not a default
    assert model.quantization_config(plan_document(), cuda=False) is None  # LoRA
    monkeypatch.setattr(model, "bitsandbytes_version", lambda: "0.45.2")
    assert model.quantization_config(plan, cuda=True) is not None
    with pytest.raises(TrainerConfigError, match=r"^spec\.method\.type: .* on the CPU needs"):
        model.quantization_config(plan, cuda=False)
    bad = plan_document(method="QLoRA", hyperparameters={**QUANTISED, "computeDtype": "int8"})
    with pytest.raises(TrainerConfigError, match="computeDtype is 'int8'"):
        model.compute_dtype(bad)


def test_qlora_refuses_lora_targets_bitsandbytes_left_unquantised(tiny_model: Path) -> None:
    from kubetune.trainer.config import TrainerConfigError
    from kubetune.trainer.model import apply_method
    from tests.plans import plan_document

    # transformers keeps the LM head in full precision: not a 4-bit layer to adapt.
    hp = {**QUANTISED, "loraTargetModules": ["q_proj", "lm_head"]}
    plan = plan_document(method="QLoRA", hyperparameters=hp)
    with pytest.raises(TrainerConfigError, match=r"spec\.method\.type: .*targets lm_head"):
        apply_method(_quantised_base(str(tiny_model)), plan)
