"""Remedies that keep what the base model knew while it learns a small dataset: replay of
general text, elastic weight consolidation, low-perplexity targets, and incremental updates
from a previous output (docs/remedies.md, the evidence in docs/evidence.md).

`plan` decides without torch (the planner's `status.plan.reasons`); `train` applies them in
the trainer."""
