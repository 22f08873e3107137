"""Sharpness-aware minimisation (SAM, Foret et al. 2021) inside the HF Trainer.

Each micro-batch takes two forward and backward passes: the first finds the gradient g at
the weights w; the weights move to w + e, e = rho * g / ||g|| (the global L2 norm over the
trainable parameters), and the second pass takes the gradient there, which is what the
optimizer uses. The weights then go back to w exactly (a copy is kept, not w + e - e).

Gradient accumulation: the gradients of earlier micro-batches of the same optimizer step
are kept aside during the first pass and put back under the second, so `.grad` ends as
the sum of each micro-batch's SAM gradient. Under DDP the second backward of the last
micro-batch therefore all-reduces the whole sum, as the Trainer's own step does (earlier
micro-batches run under `no_sync`, so their perturbation comes from the local gradient;
the last one's comes from the all-reduced gradient).

Not supported: DeepSpeed ZeRO and FSDP (the weights and gradients are sharded, so neither
the global norm nor the perturbation of a whole weight is at hand) and the LOMO optimizers
(they update the weights inside backward)."""

from __future__ import annotations

from typing import Any

#: Guards the division by the gradient norm.
NORM_EPSILON = 1e-12


def _check_supported(trainer: Any) -> None:
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise ValueError(
            "sharpness-aware minimisation (spec.remedies.sam) does not support DeepSpeed "
            "ZeRO: the weights and gradients are partitioned across ranks; set "
            "spec.remedies.sam.mode to Off or run without DeepSpeed"
        )
    if getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError(
            "sharpness-aware minimisation (spec.remedies.sam) does not support FSDP: the "
            "weights and gradients are sharded across ranks"
        )
    optim = str(getattr(getattr(trainer, "args", None), "optim", "")).lower()
    if "lomo" in optim:
        raise ValueError(
            "sharpness-aware minimisation (spec.remedies.sam) does not support the LOMO "
            "optimizers: they update the weights during backward"
        )


def sam_trainer_class(base: Any, rho: float) -> Any:
    """`base` (an HF Trainer class, possibly with its own `compute_loss`) whose
    `training_step` does SAM with radius `rho`. The instance counts its forward and
    backward passes in `sam_passes` (two per micro-batch)."""
    import contextlib

    import torch

    if not rho > 0:
        raise ValueError(f"SAM rho must be positive, got {rho}")

    class SAMTrainer(base):  # type: ignore[misc]
        sam_rho: float = float(rho)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.sam_passes = 0
            _check_supported(self)

        def _sam_loss(
            self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any
        ) -> torch.Tensor:
            # A shallow copy each pass: compute_loss may pop keys (labels, token weights).
            with self.compute_loss_context_manager():
                loss: torch.Tensor = self.compute_loss(
                    model, dict(inputs), num_items_in_batch=num_items_in_batch
                )
            if self.args.n_gpu > 1:
                loss = loss.mean()  # nn.DataParallel: one loss per device
            # Older transformers releases have no loss_is_scaled_for_ga: HF's rule then.
            scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled_for_ga is not None:
                scaled = bool(scaled_for_ga)
            else:
                scaled = (
                    bool(getattr(self, "model_accepts_loss_kwargs", False))
                    and num_items_in_batch is not None
                ) or getattr(self, "compute_loss_func", None) is not None
            if not scaled:
                steps = getattr(self, "current_gradient_accumulation_steps", None)
                loss = loss / (steps or self.args.gradient_accumulation_steps)
            return loss

        def training_step(
            self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
        ) -> torch.Tensor:
            _check_supported(self)
            prepare_cp = getattr(self, "_prepare_context_parallel_inputs", None)
            cp_context: Any = contextlib.nullcontext
            if prepare_cp is not None:
                cp_context, inputs = prepare_cp(model, inputs)
            with cp_context():
                model.train()
                if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                    self.optimizer.train()
                inputs = self._prepare_inputs(inputs)
                params = [p for p in model.parameters() if p.requires_grad]

                # The earlier micro-batches' gradients stay aside during the first pass.
                kept = [p.grad for p in params]
                for p in params:
                    p.grad = None

                loss = self._sam_loss(model, inputs, num_items_in_batch)
                self.accelerator.backward(loss)
                self.sam_passes += 1

                saved: list[torch.Tensor | None] = []
                with torch.no_grad():
                    grads = [p.grad for p in params]
                    norms = [g.detach().float().norm(2) for g in grads if g is not None]
                    if norms:
                        device = norms[0].device
                        norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
                        # An inf/nan gradient (fp16 overflow) perturbs nothing; the scaler
                        # then skips the step.
                        scale = torch.where(
                            torch.isfinite(norm),
                            self.sam_rho / (norm + NORM_EPSILON),
                            torch.zeros_like(norm),
                        )
                    for p, g in zip(params, grads, strict=True):
                        if g is None or not norms:
                            saved.append(None)
                            continue
                        saved.append(p.detach().clone())
                        e = torch.nan_to_num(g.float(), nan=0.0, posinf=0.0, neginf=0.0)
                        p.add_((e * scale.to(e.device)).to(p.dtype))
                    del grads
                    # The kept sum goes back under the second pass: backward adds to it
                    # (and under DDP, the last micro-batch all-reduces the whole sum).
                    for i, p in enumerate(params):
                        p.grad = kept[i]
                        kept[i] = None
                del kept

                try:
                    sharp = self._sam_loss(model, inputs, num_items_in_batch)
                    self.accelerator.backward(sharp)
                    self.sam_passes += 1
                finally:
                    with torch.no_grad():
                        for p, w in zip(params, saved, strict=True):
                            if w is not None:
                                p.copy_(w)
                del inputs, saved, sharp

                if (
                    self.args.torch_empty_cache_steps is not None
                    and self.state.global_step % self.args.torch_empty_cache_steps == 0
                    and torch.cuda.is_available()
                ):
                    torch.cuda.empty_cache()
                return loss.detach()

    SAMTrainer.__name__ = SAMTrainer.__qualname__ = f"SAM{base.__name__}"
    return SAMTrainer
