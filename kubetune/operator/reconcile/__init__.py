"""One reconcile of one FineTuneJob: read it and its children, act, write status.

Idempotent and level-triggered: it is called on create/resume/update, on every event of
the training or prepare Job, and on a timer, and each call converges from whatever it
finds (so an operator restart at any point loses nothing and duplicates nothing).

`reconciler.py` holds the `Reconciler` and says where each phase lives.
"""

from kubetune.operator.reconcile.base import EventSink
from kubetune.operator.reconcile.draft import StatusDraft
from kubetune.operator.reconcile.plan import InputMissingError
from kubetune.operator.reconcile.reconciler import Reconciler

__all__ = ["EventSink", "InputMissingError", "Reconciler", "StatusDraft"]
