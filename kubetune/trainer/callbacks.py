"""Our additions to the Hugging Face Trainer: metrics (history, Prometheus, progress), the
early-stop policy, and the operator's stop request."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from kubetune.policy import EvalPoint, StopSettings, decide
from kubetune.trainer.server import ControlServer, TrainerMetrics


class KubetuneCallback(TrainerCallback):
    def __init__(
        self,
        *,
        settings: StopSettings,
        metrics: TrainerMetrics | None,
        control: ControlServer | None,
        history_path: Path | None,
        tokens_per_step: float,
        is_main: bool,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.control = control
        self.history_path = history_path
        self.tokens_per_step = tokens_per_step
        self.is_main = is_main
        self.evals: list[EvalPoint] = []
        self.last_train_loss: float | None = None
        self.stopped: dict[str, str] | None = None
        self.history: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.summary: dict[str, Any] = {}

    # ---- helpers
    def _record(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.is_main and self.history_path is not None:
            with self.history_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def _progress(self, state: Any) -> dict[str, Any]:
        total = max(int(state.max_steps or 0), 1)
        step = int(state.global_step)
        elapsed = time.monotonic() - self.started
        eta = elapsed / step * (total - step) if step else None
        out = {
            "step": step,
            "totalSteps": total,
            "epoch": round(float(state.epoch or 0), 4),
            "percentage": round(100.0 * step / total, 1),
        }
        if eta is not None:
            out["etaSeconds"] = round(eta)
        return out

    # ---- events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.started = time.monotonic() - 0.0
        if self.metrics:
            self.metrics.total_steps.set(state.max_steps)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
    ) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.last_train_loss = float(logs["loss"])
            row = {
                "step": state.global_step,
                "epoch": state.epoch,
                "train_loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "time": time.time(),
            }
            self._record(row)
            if self.metrics:
                self.metrics.train_loss.set(logs["loss"])
                if logs.get("learning_rate") is not None:
                    self.metrics.learning_rate.set(logs["learning_rate"])
                if logs.get("grad_norm") is not None:
                    self.metrics.grad_norm.set(float(logs["grad_norm"]))

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        prog = self._progress(state)
        self.summary["progress"] = prog
        if self.metrics:
            self.metrics.step.set(prog["step"])
            self.metrics.epoch.set(prog["epoch"])
            self.metrics.progress.set(prog["percentage"] / 100)
            if "etaSeconds" in prog:
                self.metrics.eta.set(prog["etaSeconds"])
            elapsed = max(time.monotonic() - self.started, 1e-6)
            self.metrics.tokens_per_second.set(self.tokens_per_step * prog["step"] / elapsed)
        requested = self.control is not None and self.control.stop_requested.is_set()
        if _any_rank(requested, args) and not self.stopped:
            reason = self.control.stop_reason if self.control is not None else "StopRequested"
            self.stopped = {
                "reason": reason,
                "message": f"the operator asked the trainer to stop ({reason})",
            }
            control.should_training_stop = True
            control.should_save = True

    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        metrics: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        metrics = metrics or {}
        if "eval_loss" not in metrics:
            return
        point = EvalPoint(
            step=int(state.global_step),
            eval_loss=float(metrics["eval_loss"]),
            train_loss=self.last_train_loss,
            eval_accuracy=metrics.get("eval_token_accuracy"),
        )
        self.evals.append(point)
        decision = decide(self.evals, self.settings)
        gap = None if point.train_loss is None else point.eval_loss - point.train_loss
        row = {
            "step": point.step,
            "epoch": state.epoch,
            "eval_loss": point.eval_loss,
            "eval_perplexity": point.perplexity,
            "loss_gap": gap,
            "eval_token_accuracy": point.eval_accuracy,
            "time": time.time(),
        }
        self._record(row)
        self.summary["metrics"] = {
            k: v
            for k, v in {
                "trainLoss": self.last_train_loss,
                "evalLoss": point.eval_loss,
                "lossGap": gap,
                "evalPerplexity": point.perplexity,
                "bestEvalLoss": decision.best_eval_loss,
                "bestStep": decision.best_step,
                "evalsSinceBest": decision.evals_since_best,
                "evalTokenAccuracy": point.eval_accuracy,
            }.items()
            if v is not None and (not isinstance(v, float) or math.isfinite(v))
        }
        if self.metrics:
            self.metrics.eval_loss.set(point.eval_loss)
            self.metrics.eval_perplexity.set(point.perplexity)
            if gap is not None:
                self.metrics.loss_gap.set(gap)
            if decision.best_eval_loss is not None:
                self.metrics.best_eval_loss.set(decision.best_eval_loss)
                self.metrics.best_step.set(decision.best_step or 0)
            self.metrics.evals_since_best.set(decision.evals_since_best)
        if decision.stop and not self.stopped:
            self.stopped = {"reason": decision.reason, "message": decision.message}
            if self.metrics:
                self.metrics.early_stop.labels(reason=decision.reason).set(1)
            control.should_training_stop = True


def _any_rank(flag: bool, args: Any) -> bool:
    """True on every rank when any rank says so: only rank 0 hears the operator's stop
    request, and all ranks must leave the training loop together."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=args.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
