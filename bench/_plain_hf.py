"""A plain Hugging Face Trainer run with exactly the inputs and arguments kubetune's
trainer would use (kubetune.trainer.setup.load_inputs and training_arguments) but none of
kubetune's additions: no callback, metrics endpoint, probes, token accuracy or report.
Run under torchrun by bench/trainer_overhead.py; prints one JSON line on rank 0."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import Trainer, set_seed

from kubetune.trainer.config import load_config
from kubetune.trainer.data import Collator
from kubetune.trainer.setup import load_inputs, training_arguments


def main() -> None:
    cfg = load_config(Path(sys.argv[1]))
    set_seed(cfg.seed)
    inputs = load_inputs(cfg)
    main_proc = int(os.environ.get("RANK", "0")) == 0
    args = training_arguments(
        cfg,
        cfg.output / "checkpoints",
        has_eval=inputs.val_ds is not None,
        cuda=inputs.cuda,
        bf16=inputs.bf16,
        main_proc=main_proc,
    )
    trainer = Trainer(
        model=inputs.model,
        args=args,
        train_dataset=inputs.train_ds,
        eval_dataset=inputs.val_ds,
        data_collator=Collator(pad_id=int(inputs.tokenizer.pad_token_id)),
    )
    result = trainer.train()
    if main_proc:
        print(
            "PLAIN_RESULT "
            + json.dumps(
                {
                    "train_runtime": result.metrics["train_runtime"],
                    "steps": trainer.state.global_step,
                }
            )
        )


if __name__ == "__main__":
    main()
