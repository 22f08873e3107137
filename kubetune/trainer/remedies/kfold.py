"""k-fold cross-validation inside the trainer: `cross_validate_epochs` runs the folds with the
run's own HF TrainingArguments (DeepSpeed included: every rank runs the same folds in
lockstep, as the main run does). The decision, the folds and the choice are pure, in
`kubetune.planning.kfold`."""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.planning.kfold import (
    Fold,
    choose_epoch,
    grouped_folds,
)

if TYPE_CHECKING:
    from kubetune.trainer.config import TrainerConfig
    from kubetune.trainer.setup import RunInputs

from kubetune.trainer.data import Row

log = logging.getLogger("kubetune.remedies")

# ---- torch: the folds -------------------------------------------------------------------------


class RowsDataset:
    """A list-backed dataset of already tokenised rows (a fold's share of a
    TokenizedDataset, without retokenising)."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Row:
        return self.rows[i]

    @property
    def token_count(self) -> int:
        return sum(len(r["input_ids"]) for r in self.rows)


def _fresh_inputs(cfg: TrainerConfig) -> RunInputs:
    """The run's inputs with the base model freshly loaded and seeded as the run seeds it,
    so that no fold starts from another fold's weights (or another rank's)."""
    from transformers import set_seed

    from kubetune.trainer.setup import load_inputs

    set_seed(cfg.seed)
    return load_inputs(cfg)


def _fold_arguments(cfg: TrainerConfig, inputs: RunInputs, out_dir: Path, max_epochs: int) -> Any:
    """The run's TrainingArguments (DeepSpeed config included), changed to train
    max_epochs epochs, evaluate after each, and save nothing."""
    from kubetune.trainer.runtime import rank
    from kubetune.trainer.setup import training_arguments

    base = training_arguments(
        cfg,
        out_dir,
        has_eval=True,
        cuda=inputs.cuda,
        bf16=inputs.bf16,
        main_proc=rank() == 0,
    )
    return dataclasses.replace(
        base,
        num_train_epochs=float(max_epochs),
        eval_strategy="epoch",
        save_strategy="no",
        logging_strategy="epoch",
        load_best_model_at_end=False,
        metric_for_best_model=None,
        prediction_loss_only=True,
    )


def _fold_curve(
    cfg: TrainerConfig, inputs: RunInputs, fold: Fold, max_epochs: int, out_dir: Path
) -> list[float]:
    """Train one fold and return its held-out loss after each epoch."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    from kubetune.trainer.data import Collator

    rows: list[Row] = inputs.train_ds.rows
    train_idx, held_idx = fold
    trainer = Trainer(
        model=inputs.model,
        args=_fold_arguments(cfg, inputs, out_dir, max_epochs),
        train_dataset=RowsDataset([rows[j] for j in train_idx]),
        eval_dataset=RowsDataset([rows[j] for j in held_idx]),
        data_collator=Collator(pad_id=int(inputs.tokenizer.pad_token_id)),
    )
    trainer.remove_callback(PrinterCallback)
    try:
        trainer.train()
        curve = [float(e["eval_loss"]) for e in trainer.state.log_history if "eval_loss" in e]
    finally:
        trainer.accelerator.free_memory()
        del trainer
    if len(curve) != max_epochs:
        raise RuntimeError(f"expected {max_epochs} held-out losses from the fold, got {curve}")
    return curve


def _release(cuda: bool) -> None:
    """Free what a fold left: the DeepSpeed config HF keeps for ZeRO-3 loading (the main
    run loads its model without it), Python garbage and the CUDA cache."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # type: ignore[no-untyped-call]
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


def _rounded(xs: Sequence[float]) -> list[float | None]:
    return [round(x, 6) if math.isfinite(x) else None for x in xs]


def cross_validate_epochs(
    cfg: TrainerConfig, *, folds: int, max_epochs: int, work_dir: Path
) -> dict[str, Any]:
    """Choose the epoch count by k-fold cross-validation over the run's training rows.

    Each fold loads fresh inputs (`load_inputs`: base model, method applied), trains on
    the other folds' rows with the run's TrainingArguments for max_epochs epochs (no
    checkpoints, no early stopping, no best-model reload) under work_dir/fold-i, which is
    deleted afterwards, and evaluates the held-out rows after every epoch. Every rank runs
    the same folds (the split depends only on the seed). Returns {"folds", "maxEpochs",
    "curves", "meanCurve", "epochs", "seconds"}; losses that are not finite read None."""
    from transformers import set_seed

    from kubetune.trainer.runtime import rank

    if max_epochs < 1:
        raise ValueError(f"max_epochs must be at least 1, not {max_epochs}")
    start = time.monotonic()
    main_proc = rank() == 0
    created = not work_dir.exists()
    first = _fresh_inputs(cfg)
    splits = grouped_folds(
        getattr(first.train_ds, "lines", None), len(first.train_ds), folds, cfg.seed
    )
    cuda = first.cuda
    pending: RunInputs | None = first
    del first
    if len(splits) < 2:
        raise ValueError(
            f"cross-validation needs at least 2 training rows, the run has {len(splits)}"
        )
    curves: list[list[float]] = []
    try:
        for i, fold in enumerate(splits):
            inputs = pending if pending is not None else _fresh_inputs(cfg)
            pending = None
            out_dir = work_dir / f"fold-{i}"
            try:
                curves.append(_fold_curve(cfg, inputs, fold, max_epochs, out_dir))
            finally:
                del inputs
                shutil.rmtree(out_dir, ignore_errors=True)
                _release(cuda)
            if main_proc:
                log.info(
                    "cross-validation fold %d/%d (%d rows held out): held-out loss %s",
                    i + 1,
                    len(splits),
                    len(fold[1]),
                    ", ".join(f"{x:.4f}" for x in curves[-1]),
                )
    finally:
        pending = None
        _release(cuda)
        # The main run then starts from the seeded state it would have had without folds.
        set_seed(cfg.seed)
        if created:
            shutil.rmtree(work_dir, ignore_errors=True)
    best, mean = choose_epoch(curves)
    seconds = round(time.monotonic() - start, 2)
    if main_proc:
        log.info(
            "cross-validation chose %d epoch(s) of %d (mean held-out loss %s) in %.1f s",
            best,
            max_epochs,
            ", ".join(f"{x:.4f}" for x in mean),
            seconds,
        )
    return {
        "folds": len(splits),
        "maxEpochs": max_epochs,
        "curves": [_rounded(c) for c in curves],
        "meanCurve": _rounded(mean),
        "epochs": best,
        "seconds": seconds,
    }
