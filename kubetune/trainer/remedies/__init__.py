"""The remedies' building blocks inside the trainer (torch): continuing from a previous
output, replay of general text, token weights and elastic weight consolidation in the loss,
half fine-tuning, SAM, self-rewrite and augmentation of the data, and k-fold epochs
(docs/remedies.md). What each remedy does in a plan is decided without torch in
`kubetune.planning.remedies`."""
