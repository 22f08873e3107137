"""The remedies change training as they should: replay puts general text in the stated
share of the rows the Trainer serves; the EWC penalty is zero at the base weights and grows
quadratically away from them; token weights take the stated tokens out of the loss; an
incremental update starts from the previous output (adapter or weights) with the lower
learning rate; Auto turns remedies on only when the data is much more surprising to the
base model than general text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.plan import PlanDocument
from tests.plans import plan_document
from tests.trainer.conftest import MakeRun
from tests.trainer.test_trainer import _train

pytestmark = pytest.mark.trainer

GENERAL = (
    "The river runs past the old mill and under the stone bridge.\n\n"
    "In spring the farmers plough the fields and sow the wheat.\n\n"
    "The baker opens his shop before dawn and sells fresh bread to the village."
)


def _tok_and_rows(tiny_model: Path, n: int = 24) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    from kubetune.data import Example
    from kubetune.trainer.data import TokenizedDataset
    from tests.tinymodel import rows

    tok = AutoTokenizer.from_pretrained(tiny_model)
    exs = [
        Example(line=i + 1, prompt=r["prompt"], target=r["completion"])
        for i, r in enumerate(rows(n))
    ]
    return tok, TokenizedDataset(exs, tok, 64)


def _model(tiny_model: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model)


def _plan(**states: dict[str, Any]) -> PlanDocument:
    base: dict[str, Any] = {
        "replay": {"mode": "Off", "ratio": 0.25, "state": "Off"},
        "ewc": {"mode": "Off", "lambda": 1000.0, "fisherTokens": 512, "state": "Off"},
        "lowPerplexityTargets": {"mode": "Off", "threshold": 1000.0, "weight": 0.0, "state": "Off"},
        "halfFineTuning": {"mode": "Off", "state": "Off"},
    }
    for k, v in states.items():
        base[k] = {**base[k], **v}
    return plan_document(method="Full", remedies=base)


def _prepare(tiny_model: Path, plan: PlanDocument, model: Any = None, **kw: Any) -> Any:
    from kubetune.trainer.remedies.run import prepare

    tok, ds = _tok_and_rows(tiny_model)
    return prepare(
        plan=plan,
        model=model if model is not None else _model(tiny_model),
        tokenizer=tok,
        train_ds=ds,
        general_text=GENERAL,
        evidence_text=GENERAL,
        seq_len=64,
        device="cpu",
        seed=1,
        **kw,
    ), ds


def test_replay_serves_general_text_in_the_stated_share(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from kubetune.trainer.data import Collator

    run, _ = _prepare(tiny_model, _plan(replay={"mode": "On", "state": "On", "ratio": 0.25}))
    assert run.decisions["replay"]["on"]
    mixed = run.train_dataset
    assert mixed.sources.count("general") / len(mixed) == pytest.approx(0.25, abs=0.02)
    general_ids = {
        tuple(r["input_ids"])
        for r, s in zip(mixed.rows, mixed.sources, strict=True)
        if s == "general"
    }
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to=[],
        remove_unused_columns=False,
    )  # fmt: skip
    trainer = run.trainer_class(Trainer)(
        model=_model(tiny_model),
        args=args,
        train_dataset=mixed,
        data_collator=run.collator(Collator(pad_id=0)),
    )
    served = general = 0
    for batch in trainer.get_train_dataloader():
        for ids, mask in zip(
            batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True
        ):
            row = tuple(i for i, m in zip(ids, mask, strict=True) if m)
            served += 1
            general += row in general_ids
    assert served == len(mixed)
    assert general / served == pytest.approx(0.25, abs=0.02)


def test_ewc_penalty_is_zero_at_the_base_and_grows_away_from_it(tiny_model: Path) -> None:
    import torch

    run, _ = _prepare(tiny_model, _plan(ewc={"mode": "On", "state": "On", "lambda": 10.0}))
    ewc = run.ewc
    assert ewc is not None
    assert ewc.tokens > 0
    model = _model(tiny_model)
    assert float(ewc.penalty(model).detach()) == 0.0
    fisher_sum = sum(float(f.sum()) for f in ewc.fisher)
    assert fisher_sum > 0
    assert all(float(f.min()) >= 0 for f in ewc.fisher)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    one = float(ewc.penalty(model).detach())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    two = float(ewc.penalty(model).detach())
    assert one > 0
    assert two == pytest.approx(4 * one, rel=1e-3)  # quadratic in the distance
    assert one == pytest.approx(0.5 * 10.0 * fisher_sum * 1e-4, rel=1e-3)  # lambda/2 F d^2


def test_ewc_pulls_training_towards_the_base(tiny_model: Path, tmp_path: Path) -> None:
    """The same steps move the weights less, in the Fisher-weighted distance EWC measures
    and in plain distance, with the penalty than without."""
    from transformers import Trainer, TrainingArguments

    from kubetune.trainer.data import Collator

    def train(strength: float | None) -> tuple[Any, Any]:
        on = {"mode": "On", "state": "On", "lambda": strength or 1.0}
        model = _model(tiny_model)
        run, _ = _prepare(tiny_model, _plan(ewc=on), model)
        ewc = run.ewc
        if strength is None:  # the same Fisher estimate, no penalty in the loss
            run.decisions["ewc"]["on"] = False
            run.ewc = None
        args = TrainingArguments(
            output_dir=str(tmp_path / str(strength)), per_device_train_batch_size=8,
            max_steps=15, learning_rate=1e-2, use_cpu=True, report_to=[], seed=3,
            remove_unused_columns=False, save_strategy="no", lr_scheduler_type="constant",
        )  # fmt: skip
        run.trainer_class(Trainer)(
            model=model, args=args, train_dataset=run.train_dataset,
            data_collator=run.collator(Collator(pad_id=0)),
        ).train()  # fmt: skip
        return model, ewc

    plain, ewc = train(None)
    pulled, _ = train(1e4)
    assert float(ewc.penalty(pulled).detach()) < 0.3 * float(ewc.penalty(plain).detach())


def test_low_perplexity_targets_take_the_stated_tokens_out_of_the_loss(tiny_model: Path) -> None:
    import math

    import torch
    import torch.nn.functional as F
    from transformers import Trainer, TrainingArguments

    from kubetune.trainer.data import Collator
    from kubetune.trainer.remedies.loss import row_token_nlls, weighted_rows

    model = _model(tiny_model)
    _, ds = _tok_and_rows(tiny_model)
    nlls = row_token_nlls(model, ds.rows, "cpu")
    flat = sorted(x for r in nlls for x in r)
    threshold = math.exp(flat[len(flat) // 2])  # about half the tokens are above it
    rows, low, total = weighted_rows(ds.rows, nlls, threshold, 0.0)
    assert low == sum(1 for x in flat if x > math.log(threshold))
    assert 0.3 < low / total < 0.7
    # Through prepare: the same count, and the decision says so.
    run, _ = _prepare(
        tiny_model,
        _plan(lowPerplexityTargets={"mode": "On", "state": "On", "threshold": threshold}),
        model,
    )
    assert run.decisions["lowPerplexityTargets"]["tokens"] == low
    # The loss equals plain cross-entropy with those tokens' labels set to -100.
    batch = run.collator(Collator(pad_id=0))(rows[:8])
    masked = batch["labels"].clone()
    masked[batch["weights"] == 0] = -100
    args = TrainingArguments(output_dir="/tmp/unused-kt", use_cpu=True, report_to=[])
    trainer = run.trainer_class(Trainer)(model=model, args=args)
    model.eval()
    with torch.no_grad():
        got = float(trainer.compute_loss(model, dict(batch)))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = float(
            F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                masked[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        )
    assert got == pytest.approx(want, rel=1e-5)
    # A masked token gets no gradient: its logits do not move the loss.
    assert masked.ne(-100).sum() < batch["labels"].ne(-100).sum()


def test_auto_turns_remedies_on_only_for_surprising_data() -> None:
    from kubetune.planning.evidence import Evidence, resolve

    remedies = {
        "replay": {"state": "Auto"},
        "ewc": {"state": "Off"},
        "lowPerplexityTargets": {"state": "On"},
    }
    risky = resolve(remedies, Evidence(data_perplexity=300.0, general_perplexity=30.0))
    assert risky["replay"]["on"]
    assert "10.0x" in risky["replay"]["reason"]
    assert not risky["ewc"]["on"]
    assert risky["lowPerplexityTargets"]["on"]
    calm = resolve(remedies, Evidence(data_perplexity=40.0, general_perplexity=30.0))
    assert not calm["replay"]["on"]
    assert "below 1.5x" in calm["replay"]["reason"]


def test_incremental_update_continues_the_previous_adapter_or_weights(
    tiny_model: Path, tmp_path: Path
) -> None:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    from kubetune.trainer.model import apply_method

    # A previous LoRA output: its adapter keeps training, as saved.
    lora = get_peft_model(
        _model(tiny_model),
        LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.fill_(0.05)
    lora.save_pretrained(str(tmp_path / "prev-lora" / "final"))
    plan = plan_document(remedies={"from": f"file://{tmp_path / 'prev-lora'}"})
    model = apply_method(_model(tiny_model), plan)
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b
    assert all(p.requires_grad and torch.all(p == 0.05) for p in b)
    # A previous full fine-tune: its weights replace the base weights.
    full = _model(tiny_model)
    with torch.no_grad():
        full.model.embed_tokens.weight.add_(1.0)
    full.save_pretrained(tmp_path / "prev-full" / "final")
    plan = plan_document(method="Full", remedies={"from": str(tmp_path / "prev-full")})
    model = apply_method(_model(tiny_model), plan)
    assert torch.equal(model.model.embed_tokens.weight, full.model.embed_tokens.weight)


def test_a_run_with_every_remedy_and_an_incremental_update(
    make_run: MakeRun, tiny_model: Path
) -> None:
    """End to end: Full fine-tuning with replay, EWC and token weights trains and reports
    them; a second run from its output plans the incremental learning rate and starts from
    its weights."""
    remedies = {
        "replay": {"mode": "On", "ratio": 0.3},
        "ewc": {"mode": "On", "lambda": 100},
        "lowPerplexityTargets": {"mode": "On", "threshold": 300},
    }
    hp = {"learningRate": 3e-3, "epochs": 1, "evalSteps": 4}
    run = make_run(method="Full", rows=48, hp=hp, spec_extra={"remedies": remedies})
    reasons = " ".join(run.plan["reasons"])
    assert "Replay of general text: on, set by spec.remedies" in reasons
    assert "Elastic weight consolidation: on" in reasons
    _train(run)
    report = json.loads((run.output / "report.json").read_text())
    got = report["summary"]["remedies"]
    assert all(got[name]["on"] for name in ("replay", "ewc", "lowPerplexityTargets"))
    assert any("replay:" in n for n in got["notes"])
    second = make_run(
        method="Full",
        rows=48,
        spec_extra={
            "model": {"uri": f"file://{tiny_model}", "from": f"file://{run.output}"},
            "remedies": {"replay": {"mode": "Off"}},
        },
    )
    assert second.plan["hyperparameters"]["learningRate"] == 5e-6
    assert any("Incremental update" in r for r in second.plan["reasons"])


def test_half_fine_tuning_trains_the_chosen_half_each_epoch(
    tiny_model: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from kubetune.trainer.data import Collator
    from kubetune.trainer.remedies.halfft import choose_halves

    run, _ = _prepare(tiny_model, _plan(halfFineTuning={"mode": "On", "state": "On"}))
    (hft,) = run.callbacks
    model = _model(tiny_model)
    changed: list[tuple[set[str], set[str]]] = []

    class Watch(TrainerCallback):
        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            moved = {n for n, p in model.named_parameters() if not torch.equal(p, self.before[n])}
            changed.append((moved, set(hft.selected)))

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2,
        learning_rate=1e-2, use_cpu=True, report_to=[], remove_unused_columns=False,
        save_strategy="no", weight_decay=0.1,
    )  # fmt: skip
    Trainer(
        model=model, args=args, train_dataset=run.train_dataset,
        data_collator=Collator(pad_id=0), callbacks=[hft, Watch()],
    ).train()  # fmt: skip
    names = [n for n, _ in model.named_parameters()]
    assert len(changed) == 2
    for moved, selected in changed:
        assert moved == selected  # exactly the chosen half moved (weight decay included)
        assert 0.35 < len(selected) / len(names) < 0.65
    assert changed[0][1] != changed[1][1]  # a different half each round
    assert all(p.requires_grad for p in model.parameters())  # restored at the end
    # Half of each layer's attention and MLP tensors.
    pick = choose_halves(names, 7)
    attn0 = [n for n in names if ".layers.0." in n and "self_attn" in n]
    assert len([n for n in attn0 if n in pick]) == len(attn0) // 2


def test_auto_turns_replay_on_for_surprising_data_under_the_builtin_model() -> None:
    """The built-in model finds the glossary ~1.7x as surprising as general English: Auto
    turns replay on; on English paragraphs (what it was pretrained on) it stays off."""
    from transformers import AutoModelForCausalLM

    from kubetune.data import Example, parse_jsonl
    from kubetune.planning.remedies import plan_remedies
    from kubetune.trainer.data import TokenizedDataset
    from kubetune.trainer.model import load_tokenizer, model_location
    from kubetune.trainer.remedies.replay import REPLAY_TEXT_DEFAULT, MixedDataset
    from kubetune.trainer.remedies.run import prepare
    from kubetune.trainer.runtime import GENERAL_TEXT_DEFAULT

    location = model_location("hf://kubetune/tiny-llama-en")[0]
    tok = load_tokenizer(location)
    model = AutoModelForCausalLM.from_pretrained(location)
    glossary = Path(__file__).resolve().parents[2] / "examples/data/quickstart-train.jsonl"
    _, examples = parse_jsonl(glossary.read_bytes(), str(glossary), "PromptCompletion")
    english = REPLAY_TEXT_DEFAULT.read_text().split("\n\n")[:120]
    plain = [Example(line=i + 1, prompt="", target=t.strip()) for i, t in enumerate(english)]

    def run(exs: list[Any]) -> Any:
        return prepare(
            plan=plan_remedies(plan_document(method="Full"), {}),
            model=model,
            tokenizer=tok,
            train_ds=TokenizedDataset(exs, tok, 256),
            general_text=REPLAY_TEXT_DEFAULT.read_text(),
            evidence_text=GENERAL_TEXT_DEFAULT.read_text(),
            seq_len=256,
            device="cpu",
            seed=1,
        )

    risky = run(examples)
    assert risky.evidence is not None
    assert 1.5 <= risky.evidence.ratio < 3
    assert risky.decisions["replay"]["on"]
    assert risky.decisions["replay"]["auto"]
    assert isinstance(risky.train_dataset, MixedDataset)
    assert not risky.decisions["ewc"]["on"]  # not among Auto's remedies
    assert risky.sentence() is not None
    calm = run(plain)
    assert calm.evidence is not None
    assert calm.evidence.ratio < 1.5
    assert not calm.decisions["replay"]["on"]


def _auto_method_run(make_run: MakeRun, threshold: float, nproc: int) -> Any:
    """A method-Auto run (LoRA by data size, Full as the plan's alternative) whose switch
    threshold is set so that the tiny model's evidence falls on a chosen side."""
    run = make_run(
        method="Auto",
        nproc=nproc,
        rows=32,
        hp={"epochs": 1, "evalSteps": 2, "learningRate": 1e-3},
        spec_extra={"remedies": {"replay": {"mode": "Auto"}}},
    )
    assert run.plan["method"] == "LoRA"
    alternative = run.plan["alternative"]
    assert alternative["plan"]["method"] == "Full"
    alternative["when"]["dataPerplexityRatio"] = threshold
    alternative["plan"]["hyperparameters"].update({"epochs": 1, "evalSteps": 2})
    arg = next(a for a in run.command if a.startswith("--config-dir="))
    config_dir = Path(arg.split("=", 1)[1])
    (config_dir / "plan.json").write_text(json.dumps(run.plan))
    return run


def test_method_auto_switches_to_full_fine_tuning_on_surprising_data(make_run: MakeRun) -> None:
    """Two processes over gloo: rank 0 measures the evidence once and every rank takes its
    decision (a rank that decided alone could train another method and hang the run)."""
    run = _auto_method_run(make_run, threshold=0.01, nproc=2)
    _train(run)
    plan = json.loads((run.output / "plan.json").read_text())
    assert plan["method"] == "Full"
    assert plan["switchedFrom"] == "LoRA"
    assert (run.output / "final" / "config.json").exists()
    assert not (run.output / "final" / "adapter_config.json").exists()
    decisions = run.termination()["decisions"]
    method = [d for d in decisions if d["kind"] == "method"]
    assert len(method) == 1
    assert "method Full instead of LoRA" in method[0]["text"]
    assert method[0]["plan"]["method"] == "Full"
    replay = [d for d in decisions if d.get("name") == "replay"]
    assert replay
    assert replay[0]["text"].startswith("Auto at training start: replay")
    assert plan["reasons"][-1] == method[0]["text"]


def test_method_auto_keeps_its_adapter_on_familiar_data(make_run: MakeRun) -> None:
    run = _auto_method_run(make_run, threshold=1e9, nproc=1)
    _train(run)
    plan = json.loads((run.output / "plan.json").read_text())
    assert plan["method"] == "LoRA"
    assert "switchedFrom" not in plan
    assert (run.output / "final" / "adapter_config.json").exists()
    method = [d for d in run.termination()["decisions"] if d["kind"] == "method"]
    assert "method stays LoRA" in method[0]["text"]
    assert "below 1e+09x" in method[0]["text"]


def test_auto_arms_replay_and_turns_it_on_when_forgetting_passes_the_trigger(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Auto left replay off at the start (the data is not surprising): the run keeps it
    armed, and an evaluation whose general-text perplexity ratio reaches the trigger turns
    it on, serving general text in the stated share without changing the dataset length."""
    from kubetune.planning.evidence import Evidence
    from kubetune.trainer.remedies.replay import ReplaySwitch

    plan = _plan(replay={"mode": "Auto", "state": "Auto", "ratio": 0.25, "triggerRatio": 1.3})
    unsurprising = Evidence(data_perplexity=100.0, general_perplexity=100.0)
    run, ds = _prepare(tiny_model, plan, evidence=unsurprising)
    assert not run.decisions["replay"]["on"]
    switch = run.train_dataset
    assert isinstance(switch, ReplaySwitch)
    assert len(switch) == len(ds)
    task_ids = {tuple(r["input_ids"]) for r in ds.rows}
    assert all(tuple(switch[i]["input_ids"]) in task_ids for i in range(len(switch)))
    run.state_path = tmp_path / "replay-switch.json"
    assert run.on_probes({"general_perplexity_ratio": 1.29}, 4) is None
    assert run.on_probes({}, 6) is None  # an evaluation that did not probe
    made = run.on_probes({"general_perplexity_ratio": 1.31}, 8)
    assert made is not None
    assert made["step"] == 8
    assert made["name"] == "replay"
    assert made["text"].startswith("Auto at step 8: replay on")
    assert run.decisions["replay"]["on"]
    assert run.decisions["replay"]["atStep"] == 8
    served = [switch[i % len(switch)] for i in range(400)]
    general = sum(tuple(r["input_ids"]) not in task_ids for r in served)
    assert general == 100  # exactly 25% of the rows served from now on
    assert run.on_probes({"general_perplexity_ratio": 9.0}, 10) is None  # once
    # A resumed run (the same output) has it on from the start.
    again, _ = _prepare(tiny_model, plan, evidence=unsurprising)
    assert again.switch is not None
    assert not again.switch.active
    again.state_path = run.state_path
    again.restore_switch()
    assert again.switch.active
    assert again.decisions["replay"]["atStep"] == 8


def test_a_run_records_the_mid_run_replay_decision(make_run: MakeRun, tmp_path: Path) -> None:
    """The general text is random numbers (more surprising to the tiny model than the
    data's words, so Auto leaves replay off at the start); training on rows of words makes
    numbers more surprising still, and the trigger turns replay on during the run."""
    import random

    from tests.tinymodel import random_rows

    rng = random.Random(1)
    general = tmp_path / "general.txt"
    general.write_text(
        "\n\n".join(" ".join(str(rng.randint(0, 99999)) for _ in range(14)) for _ in range(40))
    )
    words = [{**r, "prompt": "Define a term: "} for r in random_rows(48, seed=5)]
    run = make_run(
        method="Full",
        data="\n".join(json.dumps(r) for r in words),
        hp={"epochs": 3, "evalSteps": 3, "learningRate": 3e-3},
        spec_extra={
            "remedies": {
                "replay": {"mode": "Auto", "triggerRatio": 1.01},
                **{k: {"mode": "Off"} for k in ("ewc", "lowPerplexityTargets", "halfFineTuning")},
            },
            "diagnostics": {"maxOverhead": 1.0},
        },
    )
    run.env["KUBETUNE_GENERAL_TEXT_PATH"] = str(general)  # as dataset.generalTextUri does
    _train(run)
    decisions = run.termination()["decisions"]
    start = [d for d in decisions if d["step"] == 0 and d.get("name") == "replay"]
    assert start
    assert "replay off" in start[0]["text"]
    later = [d for d in decisions if d["step"] > 0]
    assert len(later) == 1, decisions
    assert "replay on" in later[0]["text"]
    ratios = [
        r["general_perplexity_ratio"] for r in run.history() if "general_perplexity_ratio" in r
    ]
    assert ratios
    assert max(ratios) >= 1.01


def test_self_rewrite_and_augmentation_change_only_the_training_rows(make_run: MakeRun) -> None:
    run = make_run(
        method="Full",
        rows=24,
        hp={"epochs": 1, "evalSteps": 2},
        spec_extra={
            "remedies": {
                "selfRewrite": {"mode": "On", "minOverlap": 0.0, "maxLengthRatio": 2.0},
                **{
                    k: {"mode": "Off"}
                    for k in ("replay", "ewc", "lowPerplexityTargets", "halfFineTuning")
                },
            },
            "augmentation": {"paraphrases": 1},
        },
    )
    assert any(r.startswith("Self-rewrite of the targets: on") for r in run.plan["reasons"])
    assert any(r.startswith("Augmentation: 1 paraphrase") for r in run.plan["reasons"])
    _train(run)
    report = json.loads((run.output / "report.json").read_text())
    data = report["summary"]["remedies"]["data"]
    assert data["selfRewrite"]["tried"] > 0
    assert data["augmentation"]["asked"] > 0
    cached = list((run.output / "data").glob("train-prepared-*.json"))
    assert len(cached) == 1
    rows = json.loads(cached[0].read_text())["examples"]
    trained = data["selfRewrite"]["rewritten"] + data["selfRewrite"]["kept"]
    assert len(rows) == trained + data["augmentation"]["produced"]
    # A second run over the same output reads the cache instead of generating again.
    before = cached[0].stat().st_mtime_ns
    _train(run)
    assert cached[0].stat().st_mtime_ns == before


def test_cross_validation_chooses_the_epochs_before_the_run(make_run: MakeRun) -> None:
    run = make_run(
        method="Full",
        rows=24,
        hp={"learningRate": 3e-3},
        spec_extra={"hyperparameters": {"crossValidation": {"mode": "On", "folds": 2}}},
    )
    assert run.plan["crossValidation"]["folds"] == 2
    assert any(r.startswith("Cross-validation: on") for r in run.plan["reasons"])
    _train(run)
    chosen = json.loads((run.output / "cross-validation.json").read_text())
    assert len(chosen["curves"]) == 2
    assert 1 <= chosen["epochs"] <= chosen["maxEpochs"]
    plan = json.loads((run.output / "plan.json").read_text())
    assert plan["hyperparameters"]["epochs"] == chosen["epochs"]
    assert plan["hyperparameters"]["totalSteps"] == (
        plan["hyperparameters"]["stepsPerEpoch"] * chosen["epochs"]
    )
    decision = run.termination()["decisions"][0]
    assert decision["kind"] == "epochs"
    assert decision["plan"]["hyperparameters"]["epochs"] == chosen["epochs"]
    assert not (run.output / "cross-validation").exists()
    steps = [r["step"] for r in run.history() if "eval_loss" in r]
    assert max(steps) <= plan["hyperparameters"]["totalSteps"]
