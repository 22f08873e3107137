"""Our additions to the Hugging Face Trainer: metrics (history, Prometheus, progress), the
diagnostics, the early-stop policy, and the operator's stop request.

Who runs the policy: in local mode (`kubetune run`) the trainer decides itself; under the
operator (`policy_owner="operator"`) the operator reads GET /evaluations, decides, and
sends POST /stop, and the trainer acts on its own decision only when the run diverged
(a non-finite or exploding loss cannot wait for the next scrape)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from kubetune import console as events
from kubetune.contract import REASON_INTERRUPTED
from kubetune.diagnostics.runner import DiagnosticsRunner
from kubetune.policy import EvalPoint, StopSettings, decide
from kubetune.trainer import interrupt
from kubetune.trainer.console import RunConsole
from kubetune.trainer.dist import from_rank0
from kubetune.trainer.server import ControlServer, TrainerMetrics

#: Diagnostics keys -> status.metrics fields.
_STATUS_FIELDS = {
    "memorization_rate_train": "memorizationRate",
    "memorization_rate_heldout": "heldoutMemorizationRate",
    "near_verbatim_rate_train": "nearVerbatimRate",
    "general_perplexity": "generalPerplexity",
    "general_perplexity_ratio": "generalPerplexityRatio",
    "data_perplexity_base": "dataPerplexity",
    "data_high_perplexity_token_ratio": "highPerplexityTokenRatio",
}

log = logging.getLogger(__name__)


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
        diagnostics: DiagnosticsRunner | None = None,
        policy_owner: str = "trainer",
        on_probes: Callable[[dict[str, float], int], dict[str, Any] | None] | None = None,
        decisions: list[dict[str, Any]] | None = None,
        console: RunConsole | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.control = control
        self.history_path = history_path
        self.tokens_per_step = tokens_per_step
        self.is_main = is_main
        self.diagnostics = diagnostics
        self.policy_owner = policy_owner
        #: Called after each evaluation's probes on every rank; a decision it returns is
        #: recorded (GET /decisions, the report, the termination message).
        self.on_probes = on_probes
        self.decisions = decisions if decisions is not None else []
        #: Rank 0's console (None on the other ranks): progress, evaluations, decisions.
        self.console = console if is_main else None
        self.best_eval_loss: float | None = None
        self.evals: list[EvalPoint] = []
        self.last_train_loss: float | None = None
        self.window_losses: list[float] = []
        self.stopped: dict[str, str] | None = None
        #: The step whose checkpoint was saved after a SIGTERM (None: not interrupted).
        self.interrupted_at: int | None = None
        self.history: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.start_step = 0
        self.summary: dict[str, Any] = {"metrics": {}}
        self.warnings: list[str] = []

    # ---- helpers
    def _record(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.is_main and self.history_path is not None:
            with self.history_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def _set_metrics(self, values: dict[str, Any]) -> None:
        self.summary["metrics"] = {
            **self.summary["metrics"],
            **{
                k: v
                for k, v in values.items()
                if v is not None and (not isinstance(v, float) or math.isfinite(v))
            },
        }

    def _progress(self, state: Any) -> dict[str, Any]:
        total = max(int(state.max_steps or 0), 1)
        step = int(state.global_step)
        elapsed = time.monotonic() - self.started
        done = step - self.start_step
        eta = elapsed / done * (total - step) if done > 0 else None
        out = {
            "step": step,
            "totalSteps": total,
            "epoch": round(float(state.epoch or 0), 4),
            "percentage": round(100.0 * step / total, 1),
        }
        if eta is not None:
            out["etaSeconds"] = round(eta)
        return out

    def _resume_history(self, state: Any) -> None:
        """After a resume: the evaluations so far (from the checkpoint's log history) so
        that the policy sees the whole run, and the history rows written before."""
        window: list[float] = []
        for entry in state.log_history or []:
            if "loss" in entry:
                window.append(float(entry["loss"]))
            if "eval_loss" in entry:
                self.evals.append(
                    EvalPoint(
                        step=int(entry.get("step", 0)),
                        eval_loss=float(entry["eval_loss"]),
                        train_loss=sum(window) / len(window) if window else None,
                        eval_accuracy=entry.get("eval_token_accuracy"),
                    )
                )
                window = []
        if self.history_path is not None and self.history_path.exists():
            for line in self.history_path.read_text().splitlines():
                row = json.loads(line)
                if int(row.get("step", 0)) <= state.global_step:
                    self.history.append(row)
            # Rows after the checkpoint are redone: rewrite the file without them.
            self.history_path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        # The probes' figures of those evaluations are in the history rows, which only rank
        # 0 reads: every rank takes rank 0's points, so that the policy decides the same.
        probed = {
            int(r["step"]): r
            for r in self.history
            if r.get("eval_loss") is not None and "step" in r
        }
        evals = [with_probes(p, probed.get(p.step, {})) for p in self.evals]
        self.evals = from_rank0(lambda: evals)
        if self.metrics is not None:
            self.metrics.history[:] = [_eval_dict(p) for p in self.evals]

    # ---- events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.started = time.monotonic()
        self.start_step = int(state.global_step)
        # A resumed run with no step left (killed after its last checkpoint) still reports
        # where it is; each step updates this.
        self.summary["progress"] = self._progress(state)
        if self.start_step > 0:
            self._resume_history(state)
        if self.metrics:
            self.metrics.total_steps.set(state.max_steps)
        if self.diagnostics is not None and kw.get("model") is not None:
            base = self.diagnostics.before_training(kw["model"], fresh=self.start_step == 0)
            self._diagnostics_out(base)
            warning = self.diagnostics.warning
            if warning:
                self.warnings.append(warning)
            if self.start_step == 0 and base:
                self._record({"step": 0, "phase": "base", **base, "time": time.time()})
        if self.console is not None:
            for d in self.decisions:
                self.console.emit(events.DECISION, text=d.get("text", ""), step=d.get("step", 0))
            if self.evals:
                self.best_eval_loss = min(p.eval_loss for p in self.evals)

    def _diagnostics_out(self, values: dict[str, float]) -> None:
        self._set_metrics({_STATUS_FIELDS[k]: v for k, v in values.items() if k in _STATUS_FIELDS})
        m = self.metrics
        if m is None:
            return
        gauges = {
            "general_perplexity": m.general_perplexity,
            "general_perplexity_base": m.general_perplexity_base,
            "general_perplexity_ratio": m.general_perplexity_ratio,
            "data_perplexity_base": m.data_perplexity_base,
            "data_high_perplexity_token_ratio": m.data_high_perplexity_token_ratio,
        }
        for key, value in values.items():
            if key in gauges:
                gauges[key].set(value)
            elif key.startswith(("memorization_rate_", "near_verbatim_rate_")):
                split = key.rsplit("_", 1)[1]
                match = "exact" if key.startswith("memorization") else "near"
                m.memorization_rate.labels(split=split, match=match).set(value)
        if self.diagnostics is not None:
            m.add_probe_seconds(self.diagnostics.watch.seconds)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
    ) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.last_train_loss = float(logs["loss"])
            self.window_losses.append(self.last_train_loss)
            row = {
                "step": state.global_step,
                "epoch": state.epoch,
                "train_loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "time": time.time(),
            }
            self._record(row)
            self._set_metrics({"trainLoss": self.last_train_loss})
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
            done = prog["step"] - self.start_step
            self.metrics.tokens_per_second.set(self.tokens_per_step * done / elapsed)
            _gpu_memory(self.metrics)
        if self.console is not None:
            self.console.emit(
                events.PROGRESS,
                **prog,
                trainLoss=self.last_train_loss,
                bestEvalLoss=self.best_eval_loss,
            )
        requested = self.control is not None and self.control.stop_requested.is_set()
        asked, terminated = _any_rank((requested, interrupt.requested()), args)
        if terminated and self.interrupted_at is None:
            # SIGTERM on some rank: every rank saves this step's checkpoint and leaves.
            self.interrupted_at = int(state.global_step)
            control.should_save = True
            control.should_training_stop = True
            # The grace period is for the save: the best model loads on the next start.
            args.load_best_model_at_end = False
            log.warning(
                "SIGTERM: saving checkpoint-%d on every rank, then stopping", state.global_step
            )
            if self.console is not None:
                self.console.emit(
                    events.STOP,
                    step=int(state.global_step),
                    reason=REASON_INTERRUPTED,
                    message=f"SIGTERM: checkpoint-{state.global_step} is saved before the"
                    " pod stops; the job resumes from it",
                    bestStep=None,
                )
            return
        if asked and not self.stopped:
            reason = self.control.stop_reason if self.control is not None else "StopRequested"
            message = (self.control.stop_message if self.control is not None else "") or (
                f"the operator asked the trainer to stop ({reason})"
            )
            self.stopped = {"reason": reason, "message": message}
            if self.metrics:
                self.metrics.early_stop.labels(reason=reason).set(1)
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
        # The train loss of the policy is the mean since the previous evaluation: one
        # step's loss is too noisy to compare gaps between evaluations.
        window = self.window_losses or (
            [self.last_train_loss] if self.last_train_loss is not None else []
        )
        point = EvalPoint(
            step=int(state.global_step),
            eval_loss=float(metrics["eval_loss"]),
            train_loss=sum(window) / len(window) if window else None,
            eval_accuracy=metrics.get("eval_token_accuracy"),
        )
        self.window_losses = []
        # The losses' decision says whether this is the last evaluation (which probes); the
        # probes' figures may then add a reason (they never remove one).
        decision = decide([*self.evals, point], self.settings)
        gap = None if point.train_loss is None else point.eval_loss - point.train_loss
        row: dict[str, Any] = {
            "step": point.step,
            "epoch": state.epoch,
            "eval_loss": point.eval_loss,
            "eval_perplexity": point.perplexity,
            "loss_gap": gap,
            "eval_token_accuracy": point.eval_accuracy,
        }
        acts = self.policy_owner == "trainer" or decision.reason == "Diverged"
        stopping = decision.stop and acts and not self.stopped
        probes: dict[str, float] = {}
        if self.diagnostics is not None and kw.get("model") is not None:
            # The run's last evaluation always probes: the planned end, or the one at
            # which the policy stops it (the same decision on every rank, which ZeRO-3's
            # gathered forwards need).
            probes = self.diagnostics.at_evaluation(
                kw["model"],
                elapsed=time.monotonic() - self.started,
                final=int(state.global_step) >= int(state.max_steps or 0) or stopping,
            )
            row.update(probes)
        if self.diagnostics is not None:
            # Rank 0's figures on every rank: the probes' decodes could differ in a last
            # bit between devices, and every rank must take the same decision.
            shared = from_rank0(lambda: probes)
            point = with_probes(point, shared)
            decision = decide([*self.evals, point], self.settings)
            acts = self.policy_owner == "trainer" or decision.reason == "Diverged"
            stopping = decision.stop and acts and not self.stopped
        self.evals.append(point)
        if self.on_probes is not None and self.diagnostics is not None:
            made = self.on_probes(probes, point.step)
            if made is not None:
                self.decisions.append(made)
                if self.metrics is not None:
                    self.metrics.add_decision(made)
                if self.console is not None:
                    self.console.emit(events.DECISION, text=made.get("text", ""), step=point.step)
        row["time"] = time.time()
        self._record(row)
        self._set_metrics(
            {
                "evalLoss": point.eval_loss,
                "lossGap": gap,
                "evalPerplexity": point.perplexity,
                "bestEvalLoss": decision.best_eval_loss,
                "bestStep": decision.best_step,
                "evalsSinceBest": decision.evals_since_best,
                "evalTokenAccuracy": point.eval_accuracy,
            }
        )
        self._diagnostics_out(probes)
        if self.metrics:
            self.metrics.history.append(_eval_dict(point))
            self.metrics.evaluations.inc()
            self.metrics.eval_loss.set(point.eval_loss)
            self.metrics.eval_perplexity.set(point.perplexity)
            if point.eval_accuracy is not None:
                self.metrics.eval_token_accuracy.set(point.eval_accuracy)
            if gap is not None:
                self.metrics.loss_gap.set(gap)
            if decision.best_eval_loss is not None:
                self.metrics.best_eval_loss.set(decision.best_eval_loss)
                self.metrics.best_step.set(decision.best_step or 0)
            self.metrics.evals_since_best.set(decision.evals_since_best)
        self.best_eval_loss = decision.best_eval_loss
        if self.console is not None:
            self.console.emit(
                events.EVALUATION,
                **{k: v for k, v in row.items() if k != "time"},
                verdict={
                    "stop": decision.stop and not self.stopped,
                    "acts": acts,
                    "reason": decision.reason,
                    "message": decision.message,
                    "bestEvalLoss": decision.best_eval_loss,
                    "bestStep": decision.best_step,
                },
            )
        if stopping:
            self.stopped = {"reason": decision.reason, "message": decision.message}
            if self.metrics:
                self.metrics.early_stop.labels(reason=decision.reason).set(1)
            control.should_training_stop = True
            if self.console is not None:
                self.console.emit(
                    events.STOP,
                    step=point.step,
                    reason=decision.reason,
                    message=decision.message,
                    bestStep=decision.best_step,
                )


def with_probes(point: EvalPoint, probes: dict[str, Any]) -> EvalPoint:
    """`point` with the probe figures the policy reads (None where a probe did not run)."""

    def figure(key: str) -> float | None:
        value = probes.get(key)
        return None if value is None else float(value)

    return replace(
        point,
        memorization_train=figure("memorization_rate_train"),
        memorization_heldout=figure("memorization_rate_heldout"),
        general_ratio=figure("general_perplexity_ratio"),
    )


def _eval_dict(p: EvalPoint) -> dict[str, Any]:
    """One row of GET /evaluations (`operator.status.eval_points` reads it back)."""
    return {
        "step": p.step,
        "evalLoss": p.eval_loss,
        "trainLoss": p.train_loss,
        "evalTokenAccuracy": p.eval_accuracy,
        "memorizationRate": p.memorization_train,
        "heldoutMemorizationRate": p.memorization_heldout,
        "generalPerplexityRatio": p.general_ratio,
    }


def _gpu_memory(metrics: TrainerMetrics) -> None:
    import torch

    if torch.cuda.is_available():
        metrics.gpu_memory_allocated.set(torch.cuda.memory_allocated())
        metrics.gpu_memory_peak.set(torch.cuda.max_memory_allocated())
        metrics.gpu_memory_reserved.set(torch.cuda.memory_reserved())


def _any_rank(flags: tuple[bool, ...], args: Any) -> tuple[bool, ...]:
    """Each flag true on every rank when any rank says so, in one all-reduce: only rank 0
    hears the operator's stop request, SIGTERM may reach one pod of several, and all ranks
    must leave the training loop (and save) together."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=args.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v > 0) for v in t.tolist())
