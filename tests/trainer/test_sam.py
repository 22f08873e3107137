"""Sharpness-aware minimisation in the Trainer: one step leaves `.grad` = the gradient at
w + rho*g/||g|| (checked against torch.autograd by hand) and the weights as they were, on
the plain Trainer and on the remedies' Trainer (token weights); with gradient accumulation
the gradients add up, scaled as the HF Trainer scales them; a short run learns with two
forward passes per micro-batch; DeepSpeed is refused; a 2-process DDP run (gloo) keeps the
ranks' weights equal."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.trainer

IGNORE = -100
RHO = 0.5  # large, so that the SAM gradient differs clearly from the plain one


def _tiny_llama(seed: int = 0) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def _batch(seed: int, weights: bool = False) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 48, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    labels = ids.clone()
    labels[:, :3] = IGNORE  # a prompt
    labels[1, 7:] = IGNORE
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if weights:
        w = torch.ones(ids.shape)
        w[0, 5:8] = 0.0  # three target tokens out of the loss
        out["weights"] = w
    return out


def _nll_sum(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """(sum of the weighted target NLLs, sum of the weights), computed here, not by HF."""
    import torch
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    w = (target != IGNORE).float()
    if "weights" in batch:
        w = w * batch["weights"][:, 1:].float()
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
        reduction="none",
    ).view(target.shape)  # fmt: skip
    return (nll * w).sum(), torch.clamp(w.sum(), min=1.0)


def _sam_grad(model: Any, loss_fn: Callable[[Any], Any], rho: float) -> tuple[list[Any], list[Any]]:
    """(plain gradient, SAM gradient) of `loss_fn` at a copy of `model`'s weights."""
    import torch

    m = copy.deepcopy(model)
    params = [p for p in m.parameters() if p.requires_grad]
    g = torch.autograd.grad(loss_fn(m), params)
    norm = torch.sqrt(torch.stack([(x.double() ** 2).sum() for x in g]).sum())
    with torch.no_grad():
        for p, x in zip(params, g, strict=True):
            p.add_((rho * x.double() / norm).to(p.dtype))
    return list(g), list(torch.autograd.grad(loss_fn(m), params))


def _trainer(base: Any, model: Any, tmp_path: Path, accum: int = 1, rho: float = RHO) -> Any:
    from transformers import TrainingArguments

    from kubetune.trainer.remedies.sam import sam_trainer_class

    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False,
        gradient_accumulation_steps=accum, per_device_train_batch_size=2,
    )  # fmt: skip
    trainer = sam_trainer_class(base, rho)(model=model, args=args)
    trainer.current_gradient_accumulation_steps = accum  # as the training loop sets it
    return trainer


def _assert_grads(model: Any, expected: list[Any]) -> None:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len(expected)
    for p, e in zip(params, expected, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("remedies", [False, True], ids=["Trainer", "RemedyTrainer"])
def test_one_step_gives_the_gradient_at_the_perturbed_weights(
    tmp_path: Path, remedies: bool
) -> None:
    import torch
    from transformers import Trainer

    from kubetune.trainer.remedies.loss import remedy_trainer_class

    base = remedy_trainer_class(Trainer, None) if remedies else Trainer
    model = _tiny_llama()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batch = _batch(1, weights=remedies)

    def loss_fn(m: Any) -> Any:
        total, count = _nll_sum(m, batch)
        return total / count  # a mean; one micro-batch, so no accumulation scaling

    plain, expected = _sam_grad(model, loss_fn, RHO)
    # Not vacuous: the SAM gradient is not the plain one.
    diff = sum(float((a - b).abs().sum()) for a, b in zip(plain, expected, strict=True))
    assert diff > 1e-3

    trainer = _trainer(base, model, tmp_path)
    loss = trainer.training_step(trainer.model, dict(batch))
    _assert_grads(model, expected)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.sam_passes == 2
    assert not loss.requires_grad
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(loss_fn(model)), rel=1e-5)

    # The logged loss is what the HF Trainer's own training_step returns.
    ref_model = copy.deepcopy(model)
    ref_model.zero_grad(set_to_none=True)
    ref: Any = base(model=ref_model, args=trainer.args)
    ref.current_gradient_accumulation_steps = 1
    assert float(ref.training_step(ref.model, dict(batch))) == pytest.approx(float(loss), rel=1e-6)


def test_accumulation_adds_the_micro_batches_sam_gradients(tmp_path: Path) -> None:
    import torch
    from transformers import Trainer

    model = _tiny_llama(seed=3)
    batches = [_batch(11), _batch(12)]
    # As the training loop passes it: the target tokens of the whole optimizer step.
    items = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    expected: list[Any] = []
    for b in batches:

        def loss_fn(m: Any, b: dict[str, Any] = b) -> Any:
            return _nll_sum(m, b)[0] / items  # HF: sum over the step's tokens

        _, sam = _sam_grad(model, loss_fn, RHO)
        expected = sam if not expected else [a + s for a, s in zip(expected, sam, strict=True)]

    trainer = _trainer(Trainer, model, tmp_path, accum=2)
    assert trainer.model_accepts_loss_kwargs  # so HF scales by num_items_in_batch
    losses = [
        float(trainer.training_step(trainer.model, dict(b), torch.tensor(items))) for b in batches
    ]
    _assert_grads(model, expected)
    assert trainer.sam_passes == 4
    with torch.no_grad():
        for b, got in zip(batches, losses, strict=True):
            assert got == pytest.approx(float(_nll_sum(model, b)[0] / items), rel=1e-5)

    # Without num_items_in_batch (e.g. the remedies' Trainer), each micro-batch's mean loss
    # is divided by the accumulation steps, as HF does.
    model.zero_grad(set_to_none=True)
    trainer.sam_passes = 0
    expected = []
    for b in batches:

        def mean_fn(m: Any, b: dict[str, Any] = b) -> Any:
            total, count = _nll_sum(m, b)
            return total / count / 2

        _, sam = _sam_grad(model, mean_fn, RHO)
        expected = sam if not expected else [a + s for a, s in zip(expected, sam, strict=True)]
    for b in batches:
        trainer.training_step(trainer.model, dict(b))
    _assert_grads(model, expected)
    assert trainer.sam_passes == 4


def test_short_run_learns_with_two_passes_per_micro_batch(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from kubetune.data import Example
    from kubetune.trainer.data import Collator, TokenizedDataset
    from kubetune.trainer.remedies.sam import sam_trainer_class
    from tests.tinymodel import random_rows

    tok = AutoTokenizer.from_pretrained(tiny_model)
    exs = [
        Example(line=i + 1, prompt=r["prompt"], target=r["completion"])
        for i, r in enumerate(random_rows(8, seed=5))
    ]
    ds = TokenizedDataset(exs, tok, 64)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    forwards = [0]
    model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=3e-3,
        num_train_epochs=6, logging_steps=1, save_strategy="no", lr_scheduler_type="constant",
        warmup_steps=0, seed=1, data_seed=1,
    )  # fmt: skip
    trainer = sam_trainer_class(Trainer, 0.05)(
        model=model, args=args, train_dataset=ds, data_collator=Collator(pad_id=0)
    )
    trainer.train()
    micro_batches = 6 * len(ds) // 2
    assert trainer.state.global_step == micro_batches // 2
    assert trainer.sam_passes == 2 * micro_batches
    assert forwards[0] == 2 * micro_batches
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == trainer.state.global_step
    assert losses[-1] < 0.7 * losses[0], losses


def test_deepspeed_is_refused(tmp_path: Path) -> None:
    from transformers import Trainer

    trainer = _trainer(Trainer, _tiny_llama(), tmp_path)
    trainer.is_deepspeed_enabled = True
    with pytest.raises(ValueError, match="DeepSpeed"):
        trainer.training_step(trainer.model, _batch(1))
    assert trainer.sam_passes == 0
    assert all(p.grad is None for p in trainer.model.parameters())


def test_bad_rho_is_refused() -> None:
    from transformers import Trainer

    from kubetune.trainer.remedies.sam import sam_trainer_class

    with pytest.raises(ValueError, match="rho"):
        sam_trainer_class(Trainer, 0.0)


DDP_SCRIPT = """
import json, os, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from kubetune.trainer.remedies.sam import sam_trainer_class

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                  pad_token_id=0)
model = LlamaForCausalLM(cfg)
g = torch.Generator().manual_seed(7)
rows = []
for _ in range(16):
    ids = torch.randint(1, 48, (10,), generator=g).tolist()
    rows.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * 10})

class DS(torch.utils.data.Dataset):
    def __len__(self): return len(rows)
    def __getitem__(self, i): return {k: torch.tensor(v) for k, v in rows[i].items()}

args = TrainingArguments(output_dir=sys.argv[1], use_cpu=True, report_to=[],
    per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
    num_train_epochs=3, logging_steps=1, save_strategy="no", lr_scheduler_type="constant",
    ddp_backend="gloo", seed=1)
trainer = sam_trainer_class(Trainer, 0.05)(model=model, args=args, train_dataset=DS())
trainer.train()
rank = int(os.environ["RANK"])
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
torch.save(flat, os.path.join(sys.argv[1], f"w{rank}.pt"))
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
with open(os.path.join(sys.argv[1], f"r{rank}.json"), "w") as f:
    json.dump({"passes": trainer.sam_passes, "steps": trainer.state.global_step,
               "world": int(os.environ["WORLD_SIZE"]), "losses": losses}, f)
"""


def test_ddp_two_processes_keep_the_ranks_equal(tmp_path: Path) -> None:
    import torch

    script = tmp_path / "ddp_sam.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "CUDA_VISIBLE_DEVICES": "",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(script), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    w0, w1 = (torch.load(tmp_path / f"w{r}.pt") for r in (0, 1))
    assert torch.equal(w0, w1)
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == 2
    # 16 rows / 2 ranks / 2 per micro-batch = 4 micro-batches an epoch, 3 epochs.
    assert r0["passes"] == r1["passes"] == 2 * 12
    assert r0["steps"] == 6
    assert r0["losses"][-1] < r0["losses"][0]
