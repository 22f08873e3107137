"""The plan after a decision at training start: k-fold cross-validation chose the epoch
count, or the remedies changed the number of training rows (replay mixes general text in).
The same plan document is updated, its steps included, with a decision that says so; the
steps come from the planner's own arithmetic."""

from __future__ import annotations

from kubetune.api.plan import DECISION_ANCHORS, STEPS_AT_START, Decision, PlanDocument
from kubetune.planning.hyperparameters import (
    eval_steps_for,
    total_steps_for,
    training_steps,
    warmup_steps_for,
)


def _with_steps(
    plan: PlanDocument, steps_per_epoch: int, epochs: int, *, eval_steps_set: bool
) -> PlanDocument:
    hp = plan.hyperparameters
    total = total_steps_for(steps_per_epoch, epochs)
    update: dict[str, int] = {
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "warmup_steps": warmup_steps_for(total),
    }
    if not eval_steps_set:
        update["eval_steps"] = eval_steps_for(total)
    return plan.model_copy(update={"hyperparameters": hp.model_copy(update=update)})


def with_epochs(plan: PlanDocument, epochs: int, *, eval_steps_set: bool) -> PlanDocument:
    """The plan (and its alternative) trained for `epochs` epochs: steps, warm-up and
    (unless the user set it) the evaluation interval follow."""
    out = _with_steps(
        plan, plan.hyperparameters.steps_per_epoch, epochs, eval_steps_set=eval_steps_set
    )
    if out.alternative is not None:
        chosen = with_epochs(out.alternative.plan, epochs, eval_steps_set=eval_steps_set)
        out = out.model_copy(
            update={"alternative": out.alternative.model_copy(update={"plan": chosen})}
        )
    return out


def with_training_rows(plan: PlanDocument, rows: int) -> PlanDocument:
    """The plan for the `rows` the run trains on (the examples it was planned for, with what
    the remedies added, replay's general text): the same epochs, the steps recomputed, with a
    decision that says so. The plan itself when the count of steps does not change."""
    hp = plan.hyperparameters
    per_epoch, total = training_steps(
        rows, hp.micro_batch_size, hp.gradient_accumulation_steps, plan.world_size, hp.epochs
    )
    if per_epoch == hp.steps_per_epoch:
        return plan
    # Warm-up and the evaluation interval stay as planned: they are what the run uses.
    out = plan.model_copy(
        update={
            "hyperparameters": hp.model_copy(
                update={"steps_per_epoch": per_epoch, "total_steps": total}
            )
        }
    )
    sentence = (
        f"Steps at training start: the run trains on {rows:,} rows where the plan counted "
        f"{plan.example_count:,} examples (replay and augmentation add rows; an example with "
        f"no target token left after truncation is dropped), so {per_epoch} steps per epoch, "
        f"{total} in all (planned {hp.total_steps}); warm-up and evaluation interval as planned."
    )
    steps = Decision(key=STEPS_AT_START, value=str(total), sentence=sentence)
    return out.with_decision(steps, after=DECISION_ANCHORS[STEPS_AT_START])
