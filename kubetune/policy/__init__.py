"""The early-stop policy (pure): evaluation history -> decision with a reason."""

from kubetune.policy.early_stop import Decision, EvalPoint, StopSettings, decide

__all__ = ["Decision", "EvalPoint", "StopSettings", "decide"]
