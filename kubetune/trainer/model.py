"""Load the base model and tokenizer, and apply the planned method (Full, LoRA, QLoRA,
Prefix, Partial; LoRA and QLoRA with DoRA when the plan says so)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TypeVar

from kubetune.api.plan import PlanDocument
from kubetune.contract import secret_value
from kubetune.trainer.config import TrainerConfigError

log = logging.getLogger("kubetune.trainer")


def model_location(uri: str) -> tuple[str, str | None]:
    """A path or hub id `from_pretrained` understands, and the revision."""
    if uri.startswith("hf://kubetune/"):
        from kubetune.trainer import basemodel

        return str(basemodel.resolve_model(uri)), None
    if uri.startswith("hf://"):
        return uri.removeprefix("hf://"), None
    path = Path(uri.removeprefix("file://"))
    if not (path / "config.json").exists():
        raise TrainerConfigError(
            f"no model at {path}: expected a directory with config.json (spec.model.uri)"
        )
    return str(path), None


def load_tokenizer(location: str, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(location, revision=revision, token=secret_value("HF_TOKEN"))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    location: str, revision: str | None = None, dtype: Any = None, quantization: Any = None
) -> Any:
    """The causal LM; quantised as `quantization` (a BitsAndBytesConfig) says, on this
    process's device (a quantised model is placed while it loads)."""
    from transformers import AutoModelForCausalLM

    placement: dict[str, Any] = {}
    if quantization is not None:
        from kubetune.trainer.runtime import run_device

        placement = {"quantization_config": quantization, "device_map": {"": run_device()}}
    return AutoModelForCausalLM.from_pretrained(
        location,
        revision=revision,
        dtype=dtype,
        token=secret_value("HF_TOKEN"),
        **placement,
    )


def compute_dtype(plan: PlanDocument) -> Any:
    """The planned QLoRA compute dtype as a torch dtype."""
    import torch

    name = _planned(plan.hyperparameters.compute_dtype, "computeDtype")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TrainerConfigError(
            f"plan.json: hyperparameters.computeDtype is {name!r}, not a torch float dtype"
        )
    return dtype


def bitsandbytes_version() -> str | None:
    """The installed bitsandbytes version, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None


def quantization_config(plan: PlanDocument, cuda: bool) -> Any:
    """QLoRA's BitsAndBytesConfig (4-bit NF4, double quantisation, the planned compute
    dtype); None for the other methods. Raises TrainerConfigError naming spec.method.type
    when the installed bitsandbytes cannot run it on this device."""
    if plan.method != "QLoRA":
        return None
    from transformers import BitsAndBytesConfig

    from kubetune.planning.quantization import bitsandbytes_problem

    problem = bitsandbytes_problem(bitsandbytes_version(), "GPU" if cuda else "CPU")
    if problem is not None:
        raise TrainerConfigError(f"spec.method.type: {problem}")
    hp = plan.hyperparameters
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type=_planned(hp.quant_type, "quantType"),
        bnb_4bit_use_double_quant=_planned(hp.double_quant, "doubleQuant"),
        bnb_4bit_compute_dtype=compute_dtype(plan),
    )


def _quantised_names(model: Any) -> set[str]:
    """The last module names of the linear layers bitsandbytes stores in 4 bits."""
    return {
        name.rsplit(".", 1)[-1]
        for name, mod in model.named_modules()
        if type(mod).__name__ == "Linear4bit"
    }


def _lora_names(peft_model: Any) -> list[str]:
    """The last names of the modules peft wrapped (``BaseTuner.targeted_module_names``)."""
    names = peft_model.base_model.targeted_module_names
    return sorted({str(name).rsplit(".", 1)[-1] for name in names})


def _adaptable_names(model: Any) -> list[str]:
    """The last names of the modules peft's own "all-linear" rule selects (``nn.Linear`` and
    transformers' ``Conv1D``, without the LM head), for an error message: peft has no public
    function for the rule, so the model is wrapped with ``target_modules="all-linear"`` and the
    wrapped names are read back. Only called when the run stops anyway (it changes ``model``)."""
    from peft import LoraConfig, TaskType, get_peft_model

    try:
        wrapped = get_peft_model(
            model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=1, target_modules="all-linear")
        )
    except ValueError:  # peft's NoMatchingPeftModuleError: nothing linear at all
        return []
    return _lora_names(wrapped)


def _apply_lora(
    model: Any, wanted: list[str], rank: int, alpha: int, dropout: float, *, use_dora: bool
) -> Any:
    """LoRA on the planned target modules, matched by peft's own rules (a module whose name
    ends in a target; ``nn.Linear``, GPT-2's ``Conv1D`` and the other layer types peft
    supports). Raises TrainerConfigError naming what the model has when none matches."""
    from peft import LoraConfig, TaskType, get_peft_model

    cfg = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=wanted,
        use_dora=use_dora,
    )
    try:
        wrapped = get_peft_model(model, cfg)
    except ValueError as err:  # NoMatchingPeftModuleError, or a module type LoRA cannot adapt
        raise TrainerConfigError(
            f"none of the LoRA target modules {wanted} can be adapted in this model ({err}); "
            f"peft's all-linear rule finds {_adaptable_names(model)} "
            "(set spec.method.lora.targetModules)"
        ) from err
    missing = sorted(set(wanted) - set(_lora_names(wrapped)))
    if missing:
        log.warning(
            "LoRA target modules %s are not in this model; adapting %s only",
            missing,
            _lora_names(wrapped),
        )
    return wrapped


#: Where transformers keeps the decoder layers of the families in the planner's table.
DECODER_STACKS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")
#: The name of the norm after the last decoder layer, beside the stack.
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "norm_f")


def _attribute(obj: Any, path: str) -> Any | None:
    """``obj.a.b`` for the path ``"a.b"``; None where an attribute is missing."""
    for part in path.split(".") if path else ():
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _decoder_stack(model: Any) -> tuple[list[Any], Any | None]:
    """The decoder layers and the final norm (None when the model has none, as OPT-350m).
    The layers are at one of ``DECODER_STACKS``, else (a family outside the table) the
    longest ``nn.ModuleList`` of the model; the final norm sits beside them."""
    for path in DECODER_STACKS:
        parent_path, _, name = path.rpartition(".")
        parent = _attribute(model, parent_path)
        layers = getattr(parent, name, None) if parent is not None else None
        if layers is not None:
            return list(layers), _beside(parent)
    import torch

    lists = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.ModuleList) and len(mod)
    }
    if not lists:
        raise TrainerConfigError(
            "cannot find the decoder layers of this architecture for "
            "Partial fine-tuning; choose LoRA or Full"
        )
    # The stack with one entry per decoder layer (num_hidden_layers), not a longer list
    # such as a mixture-of-experts layer's experts; else the longest.
    layer_count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    matching = [name for name in lists if len(lists[name]) == layer_count]
    stack = min(matching, key=len) if matching else max(lists, key=lambda n: len(lists[n]))
    return list(lists[stack]), _beside(model.get_submodule(stack.rpartition(".")[0]))


def _beside(parent: Any) -> Any | None:
    """The final norm: the first of ``FINAL_NORMS`` the decoder stack's parent has."""
    return next((n for a in FINAL_NORMS if (n := getattr(parent, a, None)) is not None), None)


def apply_method(model: Any, plan: PlanDocument) -> Any:
    """Wrap or freeze the model as the plan says; returns the model to train."""
    previous = plan.remedies.from_ if plan.remedies is not None else None
    if previous:  # an incremental update: a previous adapter keeps training as it is
        from kubetune.trainer.remedies.previous import load_previous, previous_output

        if plan.method == "QLoRA":
            if not (previous_output(str(previous)) / "adapter_config.json").exists():
                raise TrainerConfigError(
                    "spec.model.from: QLoRA continues a previous adapter only; this output "
                    "holds full weights, which would load unquantised: choose LoRA or Full"
                )
            model = _prepare_quantised(model, [], plan.hyperparameters.gradient_checkpointing)
        model, is_adapter = load_previous(model, str(previous))
        if is_adapter:
            return model
    method, hp = plan.method, plan.hyperparameters
    if method == "Full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method in ("LoRA", "QLoRA"):
        wanted = list(_planned(hp.lora_target_modules, "loraTargetModules"))
        if method == "QLoRA":
            present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            targets = [t for t in wanted if t in present]
            model = _prepare_quantised(model, targets, hp.gradient_checkpointing)
        return _apply_lora(
            model,
            wanted,
            _planned(hp.lora_rank, "loraRank"),
            _planned(hp.lora_alpha, "loraAlpha"),
            _planned(hp.lora_dropout, "loraDropout"),
            use_dora=bool(hp.lora_use_dora),
        )
    if method == "Prefix":
        from peft import PrefixTuningConfig, TaskType, get_peft_model

        tokens = _planned(hp.prefix_tokens, "prefixTokens")
        return get_peft_model(
            model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=tokens)
        )
    layers, final_norm = _decoder_stack(model)  # Partial: the top layers and the final norm
    n = _planned(hp.trainable_layers, "trainableLayers")
    if not 1 <= n <= len(layers):  # layers[-0:] or a longer slice would train every layer
        raise TrainerConfigError(
            f"plan.json: hyperparameters.trainableLayers is {n}, but the model has "
            f"{len(layers)} decoder layers (spec.method.partial)"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in [*layers[-n:], *([final_norm] if final_norm is not None else [])]:
        for p in layer.parameters():
            p.requires_grad_(True)
    return model


T = TypeVar("T")


def _planned(value: T | None, key: str) -> T:
    """A method setting the plan must carry (the planner sets it for its method)."""
    if value is None:
        raise TrainerConfigError(f"plan.json: hyperparameters.{key} is not set for this method")
    return value


def _parameter_count(p: Any) -> int:
    """A parameter's weights; bitsandbytes packs a 4-bit layer's weights into a uint8
    tensor (two per byte, or more per element of a wider storage dtype), as peft counts."""
    n = int(p.numel())
    if type(p).__name__ == "Params4bit":
        storage = getattr(p, "quant_storage", None)
        n *= 2 * int(getattr(storage, "itemsize", 1) or 1)
    return n


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) weights, a 4-bit base counted at its real size."""
    trainable = sum(_parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(_parameter_count(p) for p in model.parameters())
    return trainable, total


def _prepare_quantised(model: Any, targets: list[str], checkpointing: bool) -> Any:
    """peft's preparation of a 4-bit model for training (the base frozen, what is not 4-bit
    in fp32, gradients into the checkpointed layers' inputs), once the LoRA targets are
    known to be quantised."""
    import torch
    from peft import prepare_model_for_kbit_training

    if not getattr(model, "is_loaded_in_4bit", False):
        raise TrainerConfigError(
            "plan.json: method QLoRA, but the base model was not loaded in 4 bits"
        )
    quantised = _quantised_names(model)
    unquantised = [t for t in targets if t not in quantised]
    if unquantised:
        raise TrainerConfigError(
            f"spec.method.type: bitsandbytes did not quantise the LoRA targets "
            f"{', '.join(unquantised)} of this architecture (4-bit layers: "
            f"{', '.join(sorted(quantised)) or 'none'}); choose LoRA or set "
            "spec.method.lora.targetModules to 4-bit layers"
        )
    use_checkpointing = checkpointing and torch.cuda.is_available()
    return prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
        model, use_gradient_checkpointing=use_checkpointing
    )
