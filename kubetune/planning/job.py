"""Turn a FineTuneJob's inputs into a plan: shared by the operator (in-process, when the
data and the model config can be read through the API), the prepare pod, the CLI and
``kubetune run``.

Everything here is pure given the texts; fetching them is the caller's business. The one
read of its own: when the model source is a local directory, the safetensors headers of its
weights (``model_arch_with_weights``: a few kilobytes per file, never the weights).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kubetune.api.plan import Alternative, AlternativeWhen, Decision, PlanDocument
from kubetune.api.spec import FineTuneJobSpec
from kubetune.data import DataError, Example, summarize
from kubetune.data.dedup import DedupSettings
from kubetune.data.formats import read_dataset
from kubetune.data.hub import HubDataset, read_hub_dataset
from kubetune.data.mixture import Source, mixed_rows
from kubetune.data.quality import QualityReport
from kubetune.data.stats import Format, plan_warnings
from kubetune.data.tokens import (
    TOKENIZER_FILE,
    ModelTokenizer,
    estimated_lengths,
    find_tokenizer,
    model_directory,
)
from kubetune.planning import bundled_architectures
from kubetune.planning.hyperparameters import sequence_cap, training_steps
from kubetune.planning.inputs import DatasetStats, PlanRequest, Resources
from kubetune.planning.memory import Offload
from kubetune.planning.methods import Method, lora_targets, partial_layer_count
from kubetune.planning.model import (
    ModelArch,
    ModelConfigError,
    model_arch_from_config,
    with_weight_counts,
)
from kubetune.planning.plan import SURPRISING_DATA_RATIO, make_plan, method_alternative
from kubetune.planning.quantization import qlora_setting_problem
from kubetune.planning.remedies import plan_remedies
from kubetune.planning.weights import WeightCounts, WeightsHeaderError, read_weight_counts

# A CPU "GPU" for local runs: the share of host memory one training process may use.
CPU_PROCESS_MEMORY_GIB = 8.0


@cache
def _catalogue() -> dict[str, Path]:
    """Bundled model configs by their hub id (lower case)."""
    out: dict[str, Path] = {}
    for path in bundled_architectures().values():
        name = json.loads(path.read_text()).get("_name_or_path")
        if name:
            out[str(name).lower()] = path
    return out


BUILTIN_CONFIGS = Path(__file__).resolve().parent / "builtin"


def builtin_model_config(uri: str) -> dict[str, Any] | None:
    """config.json of a model kubetune builds itself (`hf://kubetune/<name>`), shipped
    beside the planner so that nothing torch-side is imported to plan it (a unit test keeps
    these files equal to kubetune.trainer.basemodel's recipes); None for an unknown name."""
    name = uri.removeprefix("hf://kubetune/").strip("/")
    path = BUILTIN_CONFIGS / f"{name}.json"
    if "/" in name or not path.is_file():
        return None
    config: dict[str, Any] = json.loads(path.read_text())
    return config


def known_model_config(uri: str) -> dict[str, Any] | None:
    """The config.json of a well-known hub model we ship, so the operator can plan without
    downloading anything; None for other models."""
    parsed = urlparse(uri)
    if parsed.scheme != "hf":
        return None
    if parsed.netloc == "kubetune":
        return builtin_model_config(uri)
    path = _catalogue().get(f"{parsed.netloc}{parsed.path}".lower())
    return json.loads(path.read_text()) if path else None


def gpu_memory_from_nodes(
    nodes: list[dict[str, Any]], node_selector: dict[str, str], gpus_per_node: int
) -> float | None:
    """The smallest `nvidia.com/gpu.memory` (MiB, as GPU feature discovery labels it) among
    nodes that match the selector and have enough GPUs, in GiB."""
    found: list[float] = []
    for node in nodes:
        meta_labels = (node.get("metadata") or {}).get("labels") or {}
        if any(meta_labels.get(k) != v for k, v in node_selector.items()):
            continue
        alloc = ((node.get("status") or {}).get("allocatable") or {}).get("nvidia.com/gpu", "0")
        if int(alloc) < gpus_per_node:
            continue
        mib = meta_labels.get("nvidia.com/gpu.memory")
        if mib and mib.isdigit():
            found.append(int(mib) / 1024)
    return min(found) if found else None


def resolve_gpu_memory(
    spec: FineTuneJobSpec, nodes: list[dict[str, Any]] | None, default_gib: float
) -> tuple[float, str]:
    """GPU memory per device for planning, and where the figure came from."""
    gpus = int(spec.resources.gpus_per_node)
    if gpus == 0:
        return CPU_PROCESS_MEMORY_GIB, (
            f"gpusPerNode is 0: planning CPU training with {CPU_PROCESS_MEMORY_GIB:g} GiB "
            "of host memory per process"
        )
    if spec.resources.gpu_memory_gib:
        return float(spec.resources.gpu_memory_gib), (
            f"GPU memory {spec.resources.gpu_memory_gib:g} GiB from spec.resources.gpuMemoryGiB"
        )
    from_nodes = gpu_memory_from_nodes(nodes or [], dict(spec.node_selector or {}), gpus)
    if from_nodes:
        return from_nodes, (
            f"GPU memory {from_nodes:.1f} GiB from the nvidia.com/gpu.memory "
            "label of the smallest matching node"
        )
    return default_gib, (
        f"GPU memory {default_gib:g} GiB assumed: no spec.resources."
        "gpuMemoryGiB and no node with a nvidia.com/gpu.memory label"
    )


_SUFFIX = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
    "E": 1e18,
}  # fmt: skip


def quantity_value(value: int | str) -> float:
    """A Kubernetes quantity (8, "500m", "64Gi", "1e3") as a number."""
    if isinstance(value, int):
        return float(value)
    for suffix in sorted(_SUFFIX, key=len, reverse=True):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * _SUFFIX[suffix]
    return float(value)


def host_memory_gib(spec: FineTuneJobSpec) -> float | None:
    """Host memory per node for offload: the training pod's memory limit (else request)
    from spec.resources.resourcesPerNode; None when the spec does not say."""
    rpn = spec.resources.resources_per_node
    if rpn is None:
        return None
    for section in (rpn.limits, rpn.requests):
        if section and section.get("memory") is not None:
            gib = quantity_value(section["memory"]) / 2**30
            return gib if gib > 0 else None
    return None


class PlanRequestError(ValueError):
    """The spec asks for a combination the planner cannot honour (for example an offload
    without a ZeRO stage); the job fails with InvalidSpec."""


def plan_request(spec: FineTuneJobSpec) -> PlanRequest:
    """The spec's choices as the planner takes them; raises PlanRequestError."""
    hp = spec.hyperparameters
    method = spec.method.type if spec.method and spec.method.type != "Auto" else None
    zero = spec.deepspeed.zero_stage if spec.deepspeed else "Auto"
    offload = spec.deepspeed.offload if spec.deepspeed else "Auto"
    lora = spec.method.lora if spec.method else None
    prefix = spec.method.prefix if spec.method else None
    partial = spec.method.partial if spec.method else None
    epochs = hp.epochs if hp and hp.epochs is not None else None
    if method == "QLoRA":
        problem = qlora_setting_problem(
            None if zero == "Auto" else int(zero), None if offload == "Auto" else Offload(offload)
        )
        if problem is not None:
            raise PlanRequestError(f"{problem[0]}: {problem[1]}")
    try:
        return PlanRequest(
            method=None if method is None else Method(method),
            incremental=bool(hp.incremental) if hp else False,
            max_seq_length=spec.dataset.max_seq_length,
            zero_stage=None if zero == "Auto" else int(zero),
            offload=None if offload == "Auto" else Offload(offload),
            micro_batch_size=hp.micro_batch_size if hp else None,
            epochs=None if epochs is None else max(1, round(float(epochs))),
            learning_rate=hp.learning_rate if hp else None,
            lora_rank=lora.rank if lora is not None else None,
            lora_alpha=lora.alpha if lora is not None else None,
            lora_dropout=lora.dropout if lora is not None else None,
            lora_target_modules=(
                tuple(lora.target_modules) if lora is not None and lora.target_modules else None
            ),
            lora_use_dora=bool(lora.use_dora) if lora is not None else False,
            prefix_tokens=prefix.num_virtual_tokens if prefix is not None else None,
            partial_layers=partial.trainable_layers if partial is not None else None,
            partial_fraction=partial.fraction if partial is not None else None,
        )
    except ValueError as exc:
        raise PlanRequestError(
            f"spec: {exc}; change spec.deepspeed or spec.hyperparameters"
        ) from exc


def check_method_settings(request: PlanRequest, arch: ModelArch) -> None:
    """The method settings the model cannot take (a LoRA target it does not have, more
    trainable layers than it has), as a PlanRequestError naming the spec field."""
    checks: tuple[tuple[str, Callable[[], object]], ...] = (
        ("spec.method.lora.targetModules", lambda: lora_targets(arch, request.lora_target_modules)),
        (
            "spec.method.partial.trainableLayers",
            lambda: partial_layer_count(arch, request.partial_layers, request.partial_fraction),
        ),
    )
    for field, check in checks:
        try:
            check()
        except ValueError as exc:
            raise PlanRequestError(f"{field}: {exc}") from exc


#: What the prepare step found of a hub model's headers (`planning.hubweights`): the counts,
#: or none and why.
HubWeights = tuple[WeightCounts | None, str]


def model_arch_with_weights(
    model_config: dict[str, Any], model_source: str, hub_weights: HubWeights | None = None
) -> ModelArch:
    """The architecture from the config; where the model is a local directory (``file://``
    or a path) with ``model.safetensors`` or its index, what their headers say
    (``with_weight_counts``); for a hub model, what the prepare step read of its headers
    (`hub_weights`). A ConfigMap source has no headers to read: a family outside the table is
    then planned on Llama-like assumptions, and its notes say so."""
    arch = model_arch_from_config(model_config, model_source)
    if hub_weights is not None:
        counts, why = hub_weights
        if counts is not None:
            return with_weight_counts(arch, counts)
        note = f"parameters from the config's shapes: {why}"
        return replace(arch, notes=(*arch.notes, note))
    directory = model_directory(model_source)
    if directory is None:
        return arch
    try:
        counts = read_weight_counts(directory)
    except WeightsHeaderError as err:
        raise ModelConfigError(f"{model_source}: {err}") from err
    return arch if counts is None else with_weight_counts(arch, counts)


#: A file's text or bytes, its path, or a dataset on the hub.
DataInput = str | bytes | Path | HubDataset


def _read(
    data: DataInput,
    source: str,
    file_format: str | None,
    fmt: Format | None,
    columns: dict[str, str] | None,
) -> tuple[Format, list[Example]]:
    if isinstance(data, HubDataset):
        return read_hub_dataset(data, fmt, columns)
    return read_dataset(data, source, file_format, fmt, columns)


def dedup_settings(spec: FineTuneJobSpec) -> DedupSettings:
    d = spec.dataset.deduplicate
    return DedupSettings(exact=d.exact, near=d.near, threshold=float(d.threshold))


def read_job_data(
    spec: FineTuneJobSpec,
    train: DataInput,
    train_source: str,
    validation: DataInput | None = None,
    validation_source: str = "",
    extra_sources: Sequence[tuple[DataInput, str]] = (),
) -> tuple[Format, list[Source], list[Example] | None]:
    """The row format, the training files (spec.dataset.uri, then each of
    spec.dataset.sources, given in `extra_sources` as their data and name) with their
    weights, and the validation rows (None without a validation file), read as spec.dataset
    says (fileFormat, format, columns); DataError names the file and the row."""
    ds = spec.dataset
    forced = None if ds.format == "Auto" else ds.format
    columns = ds.columns.mapping() if ds.columns else None
    fmt, examples = _read(train, train_source, ds.file_format, forced, columns)
    sources = [Source(_name(train, train_source), examples, ds.weight)]
    specs = ds.sources or []
    if len(extra_sources) != len(specs):
        raise ValueError(f"{len(extra_sources)} source files for {len(specs)} dataset.sources")
    for (data, name), extra in zip(extra_sources, specs, strict=True):
        mapping = extra.columns.mapping() if extra.columns else None
        _, rows = _read(data, name, extra.file_format, fmt, mapping)
        sources.append(Source(_name(data, name), rows, extra.weight))
    held = (
        _read(validation, validation_source, ds.file_format, fmt, columns)[1]
        if validation is not None
        else None
    )
    return fmt, sources, held


def _name(data: DataInput, source: str) -> str:
    return data.source if isinstance(data, HubDataset) else source


def build_plan(
    spec: FineTuneJobSpec,
    train_text: DataInput,
    train_source: str,
    model_config: dict[str, Any],
    model_source: str,
    gpu_memory: tuple[float, str],
    validation_text: DataInput | None = None,
    validation_source: str = "",
    cpu_processes: int | None = None,
    tokenizer_source: str | None = None,
    extra_sources: Sequence[tuple[DataInput, str]] = (),
    hub_weights: HubWeights | None = None,
) -> PlanDocument:
    """Validate the data, summarise it and plan. Raises DataError / ModelConfigError /
    ValueError with messages that name the source. `cpu_processes` is the number of
    training processes per node when `gpusPerNode` is 0 (default: the spec's
    `resources.processesPerNode`, else 1; a local run's --nproc).

    Tokens are counted with the tokenizer in `tokenizer_source` (default `model_source`)
    when it is a local model directory with a tokenizer.json, else estimated; examples
    longer than the sequence length cap are truncated (with a warning) or left out, as
    spec.dataset.overlongRows says. `extra_sources` are the files of spec.dataset.sources
    (their data and name, in its order), mixed with the first as their weights say."""
    fmt, sources, validation = read_job_data(
        spec, train_text, train_source, validation_text, validation_source, extra_sources
    )
    arch = model_arch_with_weights(model_config, model_source, hub_weights)
    request = plan_request(spec)
    tokenizer, no_tokenizer = find_tokenizer(tokenizer_source or model_source)
    length: dict[int, int] = {}  # by id(example): each example's tokens
    for name, examples in [(s.name, s.examples) for s in sources] + [
        (validation_source, validation or [])
    ]:
        length.update(zip(map(id, examples), _lengths(tokenizer, examples, name), strict=True))
    cap = sequence_cap(arch, request)
    overlong = [(s.name, ex) for s in sources for ex in s.examples if length[id(ex)] > cap]
    dropping = spec.dataset.overlong_rows == "Drop"
    if dropping and overlong:
        sources = [
            replace(s, examples=[ex for ex in s.examples if length[id(ex)] <= cap]) for s in sources
        ]
        if not any(s.examples for s in sources):
            raise DataError(
                f"{train_source}: all {len(overlong)} examples are longer than the sequence "
                f"length cap of {cap:,} tokens, so spec.dataset.overlongRows: Drop leaves "
                "nothing to train on; raise spec.dataset.maxSeqLength or shorten the rows"
            )
        if validation is not None:
            validation = [ex for ex in validation if length[id(ex)] <= cap]
    pooled = [ex for s in sources for ex in s.examples]
    summary = summarize(
        pooled,
        train_source,
        fmt,
        validation or [],
        None,
        [length[id(ex)] for ex in pooled] if tokenizer is not None else None,
    )
    rows = mixed_rows(
        sources,
        validation,
        spec.dataset.validation_split,
        int(spec.hyperparameters.seed),
        dedup_settings(spec),
        validation_source,
    )
    train, held, quality = rows.train, rows.validation, rows.quality
    if not train:
        raise DataError(
            f"{train_source}: {summary.example_count} example(s) leave nothing to "
            "train on after the validation split and the weights; add data or set "
            "spec.dataset.validationUri"
        )
    first_overlong = _overlong_example(overlong, length) if overlong else ""
    stats = DatasetStats(
        example_count=len(train),
        # What the trainer trains on: an over-long row truncated to the cap it is planned at.
        token_count=sum(min(length[id(ex)], cap) for ex in train),
        max_tokens=summary.max_tokens,
        validation_count=len(held),
        duplicate_count=quality.kept_duplicates,
        leakage_count=quality.leaked,
        overlong_count=0 if dropping else len(overlong),
        tokens_estimated=summary.tokens_estimated,
        overlong_example=first_overlong,
        estimate_reason=no_tokenizer,
        quality_note=quality_note(quality),
    )
    data_decisions = [] if tokenizer is None else [_tokens_decision(tokenizer, fmt)]
    data_decisions += quality_decisions(quality)
    if len(sources) > 1:
        data_decisions.append(_mixture_decision(sources, train))
    dropped_warning = ""
    if dropping and overlong:
        dropped_warning = (
            f"{len(overlong):,} examples longer than the sequence length cap of {cap:,} "
            f"tokens were left out (spec.dataset.overlongRows: Drop); the first: "
            f"{first_overlong}."
        )
        data_decisions.append(
            Decision(key="data.overlong", value=str(len(overlong)), sentence=dropped_warning)
        )
    gpus = int(spec.resources.gpus_per_node)
    resources = Resources(
        gpus_per_node=gpus if gpus > 0 else max(1, cpu_processes or spec.resources.processes),
        gpu_memory_gib=gpu_memory[0],
        num_nodes=int(spec.resources.num_nodes),
        cpu_memory_gib=host_memory_gib(spec) if gpus > 0 else None,
        accelerator="GPU" if gpus > 0 else "CPU",
    )
    check_method_settings(request, arch)
    planned = make_plan(stats, arch, resources, request)
    alternative, why = method_alternative(stats, arch, resources, request, planned)
    if spec.model.from_ and alternative is not None:
        # An incremental update continues the previous output's method as it is.
        alternative, why = None, None
    plan = _finish(planned.to_document(), spec, summary, stats, resources, gpu_memory[1])
    plan = _with_data_decisions(plan, data_decisions, dropped_warning)
    if arch.notes:
        plan = plan.with_decision(
            Decision(key="model.shapes", sentence="; ".join(arch.notes) + "."), after="gpuMemory"
        )
    if why is not None:
        evidence = Decision(key="method.byEvidence", sentence=why)
        if alternative is not None:
            # The alternative's method decision is the planned one's and the evidence rule
            # (not "Full was requested").
            alt = _finish(alternative.to_document(), spec, summary, stats, resources, gpu_memory[1])
            alt = _with_data_decisions(alt, data_decisions, dropped_warning)
            by_size = plan.decision("method")
            if by_size is not None:
                alt = alt.with_decision(by_size)
            alt = alt.with_decision(evidence, after="method")
            plan = plan.model_copy(
                update={
                    "alternative": Alternative(
                        when=AlternativeWhen(data_perplexity_ratio=SURPRISING_DATA_RATIO),
                        plan=alt,
                    )
                }
            )
        plan = plan.with_decision(evidence, after="method")
    return plan


def _lengths(tokenizer: ModelTokenizer | None, examples: list[Example], source: str) -> list[int]:
    if tokenizer is None:
        return estimated_lengths(examples)
    return tokenizer.example_lengths(examples, source)


def _overlong_example(overlong: list[tuple[str, Example]], length: dict[int, int]) -> str:
    source, example = overlong[0]
    text = " ".join(example.text.split())
    preview = text if len(text) <= 60 else text[:57] + "..."
    return f"{source} {example.where}, {length[id(example)]:,} tokens: {preview!r}"


def _mixture_decision(sources: list[Source], train: list[Example]) -> Decision:
    """What each file adds to the training rows (short: it travels in the prepare pod's
    termination message)."""
    parts = []
    ids = [{id(ex) for ex in s.examples} for s in sources]
    for s, mine in zip(sources, ids, strict=True):
        used = sum(1 for ex in train if id(ex) in mine)
        parts.append(f"{s.name} x{s.weight:g}: {used:,}")
    return Decision(
        key="data.mixture",
        value=str(len(sources)),
        sentence=f"Training rows by file (weight: rows): {'; '.join(parts)}.",
    )


def quality_note(report: QualityReport) -> str:
    """The data decision's note when the search found nothing (short: the plan travels in
    the prepare pod's 4 KiB termination message)."""
    if report.exact or report.near or report.leaked:
        return ""
    return "No duplicates or leakage found."


def quality_decisions(report: QualityReport) -> list[Decision]:
    """What the duplicate search found and removed, and the train/validation leakage, with a
    few named rows; none when it found nothing (`quality_note` says so)."""
    s = report.settings
    near = f"near: similarity >= {s.threshold:g}"
    side = "grouped split" if report.validation == "split" else "validationUri"
    if quality_note(report):
        return []
    out: list[Decision] = []
    if report.exact or report.near:
        found = [
            f"{count:,} {kind} ({'removed' if on else 'kept'})"
            for kind, count, on in (("exact", report.exact, s.exact), ("near", report.near, s.near))
            if count
        ]
        out.append(
            Decision(
                key="data.duplicates",
                value=str(report.exact + report.near),
                sentence=f"Duplicates in {report.rows:,} training rows ({near}): "
                f"{', '.join(found)}; e.g. {'; '.join(report.examples)}.",
            )
        )
    out.append(
        Decision(
            key="data.leakage",
            value=str(report.leaked),
            sentence=(
                f"{report.leaked:,} of {report.validation_rows:,} validation rows duplicate "
                f"training rows ({report.leaked_exact:,} exact, {report.leaked_near:,} near; "
                f"{side}); e.g. {'; '.join(report.leakage_examples)}."
            )
            if report.leaked
            else f"No train/validation leakage (exact or {near}; {side}).",
        )
    )
    return out


def _tokens_decision(tokenizer: ModelTokenizer, fmt: str) -> Decision:
    """The token counts came from the model's tokenizer (short: the decision travels in the
    prepare pod's 4 KiB termination message)."""
    chat = ""
    if fmt == "Chat":
        chat = " and its chat template" if tokenizer.chat_template else " (no chat template)"
    return Decision(
        key="data.tokens",
        value="tokenizer",
        sentence=f"Tokens counted with the model's {TOKENIZER_FILE}{chat}.",
    )


def _with_data_decisions(
    plan: PlanDocument, decisions: list[Decision], warning: str
) -> PlanDocument:
    for decision in reversed(decisions):
        plan = plan.with_decision(decision, after="data")
    if warning:
        plan = plan.model_copy(update={"warnings": [*plan.warnings, warning]})
    return plan


def _finish(
    plan: PlanDocument,
    spec: FineTuneJobSpec,
    summary: Any,
    stats: DatasetStats,
    resources: Resources,
    gpu_reason: str,
) -> PlanDocument:
    """The decisions, warnings, overrides and remedies every plan carries."""
    plan = plan.model_copy(
        update={
            "warnings": [*plan.warnings, *plan_warnings(summary)],
            "dataset_format": summary.format,
        }
    )
    gpu = Decision(key="gpuMemory", value=f"{resources.gpu_memory_gib:g}", sentence=gpu_reason)
    plan = plan.with_decision_list([gpu, *plan.decisions])
    plan = apply_overrides(plan, spec, stats.example_count, resources.world_size)
    return plan_remedies(plan, spec)


def apply_overrides(
    plan: PlanDocument, spec: FineTuneJobSpec, examples: int, world: int
) -> PlanDocument:
    """Hyperparameters the user set that the planner does not take as inputs: applied to
    the plan (steps recomputed where they depend on them), with one decision that says so."""
    hp_spec = spec.hyperparameters
    hp = plan.hyperparameters
    said: list[str] = []
    update: dict[str, Any] = {}
    if hp_spec.gradient_accumulation_steps is not None:
        accum = int(hp_spec.gradient_accumulation_steps)
        steps = training_steps(examples, hp.micro_batch_size, accum, world, hp.epochs)
        update.update(
            gradient_accumulation_steps=accum,
            effective_batch_size=hp.micro_batch_size * max(world, 1) * accum,
            steps_per_epoch=steps.steps_per_epoch,
            total_steps=steps.total_steps,
        )
        said.append(f"gradient accumulation {accum} (so {steps.total_steps} steps in all)")
    total = int(update.get("total_steps", hp.total_steps))
    if hp_spec.warmup_ratio is not None:
        update["warmup_steps"] = round(float(hp_spec.warmup_ratio) * total)
        said.append(f"warmup {update['warmup_steps']} steps ({hp_spec.warmup_ratio:g} of the run)")
    if hp_spec.weight_decay is not None:
        update["weight_decay"] = float(hp_spec.weight_decay)
        said.append(f"weight decay {hp_spec.weight_decay:g}")
    if hp_spec.max_grad_norm is not None:
        update["max_grad_norm"] = float(hp_spec.max_grad_norm)
        said.append(f"gradient clipping at {hp_spec.max_grad_norm:g}")
    if hp_spec.eval_steps is not None:
        update["eval_steps"] = int(hp_spec.eval_steps)
        said.append(f"evaluation every {hp_spec.eval_steps} steps")
    if not said:
        return plan
    plan = plan.model_copy(update={"hyperparameters": hp.model_copy(update=update)})
    sentence = "Set by spec.hyperparameters: " + ", ".join(said) + "."
    return plan.with_decisions([Decision(key="overrides", sentence=sentence)])
