"""The planner: dataset + model + resources -> a Plan with the reasons behind it.

Pure functions only: no I/O, no torch. The rules and thresholds are documented in
``docs/planning.md``; every decision appends a sentence with its numbers to
``Plan.reasons``. The parts live beside this module: ``thresholds`` (the numbers),
``inputs`` (what the planner is given), ``methods`` (methods and their trainable
parameters), ``search`` (the ZeRO and activation search), ``hyperparameters`` and
``sentences`` (the reasons and warnings); ``job`` plans a FineTuneJob from its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from kubetune.api.plan import Decision, PlanDocument
from kubetune.planning.hyperparameters import (
    Hyperparameters,
    build_hyperparameters,
    preferred_micro_batch,
    sequence_length,
)
from kubetune.planning.inputs import DatasetStats, PlanRequest, Resources
from kubetune.planning.memory import MemoryEstimate, Offload
from kubetune.planning.methods import (
    Method,
    MethodChoice,
    candidate_methods,
    method_choice,
    trainable_and_frozen,
)
from kubetune.planning.model import ModelArch
from kubetune.planning.quantization import qlora_setting_problem
from kubetune.planning.search import Attempt, SearchResult, gib, search_memory
from kubetune.planning.sentences import (
    activation_sentences,
    data_warnings,
    failure_sentence,
    input_sentences,
    memory_sentence,
    no_fit_error,
    quantised_sentence,
    zero_sentences,
)


@dataclass(frozen=True)
class Plan:
    """What the planner decided, with its reasons and warnings."""

    method: Method
    zero_stage: int
    offload: Offload
    trainable_parameters: int
    total_parameters: int
    fits: bool
    memory: MemoryEstimate
    hyperparameters: Hyperparameters
    decisions: tuple[Decision, ...]
    warnings: tuple[str, ...]
    example_count: int
    token_count: int
    token_count_estimated: bool
    model_name: str
    model_family: str
    num_nodes: int
    gpus_per_node: int
    error: str | None = None

    @property
    def reasons(self) -> tuple[str, ...]:
        """One sentence per decision, in order."""
        return tuple(d.sentence for d in self.decisions)

    def to_document(self) -> PlanDocument:
        """The plan document (``status.plan``, ``plan.json``)."""
        return PlanDocument.model_validate(self._fields())

    def to_dict(self) -> dict[str, Any]:
        """The plan document as camelCase JSON-ready data."""
        return self.to_document().to_json()

    def _fields(self) -> dict[str, Any]:
        return {
            "method": str(self.method),
            "zeroStage": self.zero_stage,
            "offload": str(self.offload),
            "trainableParameters": self.trainable_parameters,
            "totalParameters": self.total_parameters,
            "fits": self.fits,
            "error": self.error,
            "model": {"name": self.model_name, "family": self.model_family},
            "numNodes": self.num_nodes,
            "gpusPerNode": self.gpus_per_node,
            "memory": self.memory.to_dict(),
            "hyperparameters": self.hyperparameters.model_dump(by_alias=True),
            "decisions": [d.model_dump(by_alias=True) for d in self.decisions],
            "warnings": list(self.warnings),
            "exampleCount": self.example_count,
            "tokenCount": self.token_count,
            "tokenCountEstimated": self.token_count_estimated,
        }


def _methods(
    dataset: DatasetStats, model: ModelArch, request: PlanRequest
) -> tuple[tuple[MethodChoice, ...], Decision]:
    """The methods to try, in order, and the sentence saying why."""
    settings = request.method_settings
    if request.method is not None:
        choice = method_choice(request.method, model, dataset.example_count, settings)
        sentence = f"Method {request.method} was requested explicitly and is honoured."
        return (choice,), Decision(key="method", value=str(request.method), sentence=sentence)
    candidates, why = candidate_methods(dataset.example_count, model, settings)
    last = candidates[-1]
    if (
        last.method is Method.LORA
        and qlora_setting_problem(request.zero_stage, request.offload) is None
    ):
        # The last resort before "add GPUs": the same adapters on a 4-bit base.
        candidates = (*candidates, replace(last, method=Method.QLORA))
    return candidates, Decision(key="method", sentence=f"Method by data size: {why}.")


def _search(
    candidates: tuple[MethodChoice, ...],
    model: ModelArch,
    resources: Resources,
    request: PlanRequest,
    seq_len: int,
    preferred: int,
    recompute_from: int,
) -> tuple[MethodChoice, SearchResult, list[Decision]]:
    """The first method that fits (else the last one tried), its search and the reasons."""
    reasons: list[Decision] = []
    last: tuple[MethodChoice, SearchResult] | None = None
    for index, choice in enumerate(candidates):
        result = search_memory(
            model, choice, resources, request, seq_len, preferred, recompute_from
        )
        tried, last = last, (choice, result)
        if result.chosen is not None:
            chosen = result.chosen
            if choice.method is Method.QLORA and tried is not None:
                sentence = quantised_sentence(model, tried[0], tried[1], chosen, resources)
                reasons.append(
                    Decision(key="method.quantised", value=str(choice.method), sentence=sentence)
                )
            reasons.append(
                Decision(
                    key="memory",
                    value=gib(chosen.memory.per_gpu),
                    sentence=memory_sentence(choice, chosen, resources),
                )
            )
            reasons += [
                Decision(key="zeroStage", value=str(chosen.stage), sentence=s)
                for s in zero_sentences(chosen, result, resources)
            ]
            reasons += [
                Decision(key="activations", sentence=s)
                for s in activation_sentences(chosen, result, preferred, request)
            ]
            return choice, result, reasons
        failure = failure_sentence(choice, result, resources)
        if index + 1 < len(candidates):
            failure += f" Falling back to {candidates[index + 1].describe()}."
        reasons.append(Decision(key="memory.fallback", value=str(choice.method), sentence=failure))
    assert last is not None  # candidates is never empty
    return last[0], last[1], reasons


def make_plan(
    dataset: DatasetStats,
    model: ModelArch,
    resources: Resources,
    request: PlanRequest | None = None,
) -> Plan:
    """Choose method, ZeRO stage, offload and hyperparameters; explain every choice."""
    request = request or PlanRequest()
    seq_len = sequence_length(dataset, model, request)
    reasons = [
        Decision(key=key, sentence=sentence)
        for key, sentence in zip(
            ("data", "model", "sequenceLength"),
            input_sentences(dataset, model, request, seq_len),
            strict=True,
        )
    ]
    candidates, why = _methods(dataset, model, request)
    reasons.append(why)
    n, world = dataset.example_count, resources.world_size
    preferred = preferred_micro_batch(seq_len, n, world, resources.accelerator)
    recompute_from = preferred_micro_batch(seq_len, n, world)
    choice, result, searched = _search(
        candidates, model, resources, request, seq_len, preferred, recompute_from
    )
    reasons.extend(searched)
    attempt: Attempt = result.chosen or result.smallest
    error: str | None = None
    if result.chosen is None:
        error = no_fit_error(choice, attempt, resources, request.method is not None)
        reasons.append(Decision(key="fits", value="false", sentence=error))
    hyper, hyper_reasons = build_hyperparameters(
        dataset,
        model,
        request,
        resources,
        choice,
        seq_len,
        attempt.micro_batch,
        attempt.gradient_checkpointing,
    )
    reasons.extend(hyper_reasons)
    trainable, _ = trainable_and_frozen(model, choice)
    reasons.append(
        Decision(
            key="trainableParameters",
            value=str(trainable),
            sentence=f"Trainable parameters: {trainable:,} of {model.total_parameters:,} "
            f"({trainable / model.total_parameters:.2%}).",
        )
    )
    return Plan(
        method=choice.method,
        zero_stage=attempt.stage,
        offload=attempt.offload,
        trainable_parameters=trainable,
        total_parameters=model.total_parameters,
        fits=result.chosen is not None,
        memory=attempt.memory,
        hyperparameters=hyper,
        decisions=tuple(reasons),
        warnings=tuple(data_warnings(dataset, seq_len)),
        example_count=dataset.example_count,
        token_count=dataset.token_count,
        token_count_estimated=dataset.tokens_estimated,
        model_name=model.name,
        model_family=model.family,
        num_nodes=resources.num_nodes,
        gpus_per_node=resources.gpus_per_node,
        error=error,
    )


#: Method Auto switches from its adapter to full fine-tuning at training start when the base
#: model's perplexity on the training targets is at least this many times its perplexity on
#: general text (kubetune.planning.remedies.RISK_RATIO is the same figure): in docs/evidence.md
#: rank-8 LoRA learned such data 7x less well than full fine-tuning, and full fine-tuning
#: with replay kept forgetting low.
SURPRISING_DATA_RATIO = 1.5


def method_alternative(
    dataset: DatasetStats,
    model: ModelArch,
    resources: Resources,
    request: PlanRequest,
    plan: Plan,
) -> tuple[Plan | None, str | None]:
    """For method Auto with an adapter chosen by data size: the full fine-tuning plan the
    trainer switches to when the base model finds the data surprising, if it fits the same
    pods (no offload, so no other host-memory request), with the sentence for the reasons."""
    if request.method is not None or not plan.fits:
        return None, None
    if plan.method not in (Method.LORA, Method.PREFIX):
        return None, None
    full = make_plan(dataset, model, resources, replace(request, method=Method.FULL))
    condition = (
        "when, at training start, the base model's perplexity on the training targets is "
        f"at least {SURPRISING_DATA_RATIO:g}x its perplexity on general text"
    )
    if not full.fits or full.offload is not Offload.NONE:
        setting = f"ZeRO-{full.zero_stage}" + (
            "" if full.offload is Offload.NONE else f", offload {full.offload}"
        )
        return None, (
            f"Method by evidence: stays {plan.method} even {condition}: full fine-tuning "
            f"would need {gib(full.memory.per_gpu)} per GPU ({setting}, fits: "
            f"{'yes' if full.fits else 'no'}) and the switch keeps to these GPUs without "
            "offload."
        )
    rate = (
        ""
        if request.learning_rate is None
        else f" The requested learning rate ({request.learning_rate:g}) trains the full "
        "weights too; they usually want a lower one than an adapter (3x lower on kubetune's "
        "benchmark model, about 10x in the literature): set spec.method.type to tune a rate "
        "for one method."
    )
    return full, (
        f"Method by evidence: switches to Full fine-tuning (ZeRO-{full.zero_stage}, "
        f"{gib(full.memory.per_gpu)} per GPU, fits) {condition}: adapters learn such data "
        "far less than full fine-tuning (docs/evidence.md), and replay (remedies Auto) "
        f"limits the forgetting.{rate}"
    )
