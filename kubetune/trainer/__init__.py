"""The trainer: `python -m kubetune.trainer` (under torchrun) fine-tunes a causal LM as the
plan says, with Hugging Face `Trainer`, `peft` and DeepSpeed, plus kubetune's callbacks
(metrics, early stopping, the stop endpoint) and outputs (adapter or weights, plan, metrics
history, report). Imports torch; the operator never imports this package."""
