"""The data-side remedies inside a run, before tokenising: self-rewrite of the training
responses by the base model and augmentation by a named model (`kubetune.trainer.remedies.rewrite`).

Rank 0 generates and every rank receives its examples (ranks generating on their own could
end with different datasets and hang); the result is cached in the output directory, so a
resumed run trains on exactly the same rows without generating again. Evaluation rows are
never rewritten or augmented."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kubetune.api.plan import PlanDocument
from kubetune.contract import Env
from kubetune.data import Example
from kubetune.trainer.dist import from_rank0

log = logging.getLogger("kubetune.remedies")

T = TypeVar("T")


@dataclass
class DataPrep:
    """The training examples after the data-side remedies, and what was done."""

    examples: list[Example]
    notes: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


def _settings(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from kubetune.api.spec import Augmentation, SelfRewrite

    remedies = spec.get("remedies") or {}
    rewrite = SelfRewrite.model_validate(remedies.get("selfRewrite") or {})
    augmentation = Augmentation.model_validate(spec.get("augmentation") or {})
    return (
        rewrite.model_dump(by_alias=True, mode="json"),
        augmentation.model_dump(by_alias=True, mode="json"),
    )


def rewrite_on(plan: PlanDocument) -> bool:
    state = plan.remedies.self_rewrite.state if plan.remedies is not None else "Off"
    return bool(state == "On")


def fingerprint(examples: list[Example], settings: dict[str, Any], model: str) -> str:
    """What the cached rows depend on: the training examples, the settings, the models."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(model.encode())
    for e in examples:
        h.update(json.dumps([e.prompt, e.target, list(e.messages)]).encode())
    return h.hexdigest()[:16]


def _dump(examples: list[Example]) -> list[dict[str, Any]]:
    return [
        {"line": e.line, "prompt": e.prompt, "target": e.target, "messages": list(e.messages)}
        for e in examples
    ]


def _load(rows: list[dict[str, Any]]) -> list[Example]:
    return [
        Example(
            line=int(r["line"]),
            prompt=str(r["prompt"]),
            target=str(r["target"]),
            messages=tuple((str(a), str(b)) for a, b in r.get("messages") or []),
        )
        for r in rows
    ]


def augmentation_model_path(spec: dict[str, Any], base: str) -> str:
    """The model that writes augmentation rows: where the operator mounted
    augmentation.modelUri, a local file:// path, or the base model."""
    from kubetune.trainer.model import model_location

    uri = os.environ.get(Env.AUGMENTATION_MODEL_PATH) or str(
        (spec.get("augmentation") or {}).get("modelUri") or ""
    )
    if not uri:
        return base
    if uri.startswith(("pvc://", "configmap://")):
        from kubetune.trainer.config import TrainerConfigError

        raise TrainerConfigError(
            f"augmentation.modelUri {uri}: mounted by the operator on a cluster; locally use "
            "file:///path/to/the/model"
        )
    return model_location(uri)[0]


def prepare_examples(
    cfg: Any, model: Any, tokenizer: Any, examples: list[Example], model_path: str
) -> DataPrep:
    """Self-rewrite (when the plan has it On) and augmentation (when asked) of the
    training examples, cached under the output directory."""
    rewrite, augmentation = _settings(cfg.spec)
    do_rewrite = rewrite_on(cfg.plan)
    do_augment = bool(augmentation["paraphrases"] or augmentation["backTranslations"])
    if not (do_rewrite or do_augment):
        return DataPrep(list(examples))
    aug_path = augmentation_model_path(cfg.spec, model_path) if do_augment else ""
    settings = {"rewrite": rewrite if do_rewrite else None, "augmentation": augmentation}
    key = fingerprint(examples, settings, f"{model_path}|{aug_path}|{cfg.seed}")
    cache = Path(cfg.output) / "data" / f"train-prepared-{key}.json"

    def compute() -> dict[str, Any]:
        if cache.exists():
            cached: dict[str, Any] = json.loads(cache.read_text())
            return cached
        result = _generate(
            cfg, model, tokenizer, examples, do_rewrite, rewrite, aug_path, model_path
        )
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(cache)
        return result

    done = from_rank0(compute)
    prep = DataPrep(_load(done["examples"]), list(done["notes"]), dict(done["stats"]))
    for note in prep.notes:
        log.info("%s", note)
    return prep


def _generate(
    cfg: Any,
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    do_rewrite: bool,
    rewrite: dict[str, Any],
    aug_path: str,
    model_path: str,
) -> dict[str, Any]:
    from kubetune.trainer.remedies import rewrite as rw
    from kubetune.trainer.runtime import run_device

    device = run_device()
    notes: list[str] = []
    stats: dict[str, Any] = {}
    out = list(examples)
    model.to(device)
    if do_rewrite:
        out, rstats = rw.rewrite_examples(
            model,
            tokenizer,
            out,
            device,
            min_overlap=float(rewrite["minOverlap"]),
            max_length_ratio=float(rewrite["maxLengthRatio"]),
            seed=cfg.seed,
        )
        stats["selfRewrite"] = rstats
        before, after = rstats.get("meanPerplexityBefore"), rstats.get("meanPerplexityAfter")
        figures = (
            f"; mean base-model perplexity of the targets {before:.1f} -> {after:.1f}"
            if before is not None and after is not None
            else ""
        )
        notes.append(
            f"self-rewrite: {rstats['rewritten']} of {len(examples)} training responses "
            f"rewritten by the base model, {rstats['kept']} kept as they were{figures}"
        )
    aug = (cfg.spec.get("augmentation") or {}) if aug_path else {}
    if aug_path:
        same = aug_path == model_path
        writer, writer_tok = (model, tokenizer) if same else _load_writer(aug_path)
        writer.to(device)
        new, astats = rw.augment_examples(
            writer,
            writer_tok,
            list(examples),
            device,
            paraphrases=int(aug.get("paraphrases") or 0),
            back_translations=int(aug.get("backTranslations") or 0),
            pivot_language=str(aug.get("pivotLanguage") or "French"),
            seed=cfg.seed,
        )
        if not same:
            del writer
        stats["augmentation"] = astats
        notes.append(
            f"augmentation: {astats['produced']} new training rows of {astats['asked']} asked "
            f"({len(examples)} examples) written by {aug_path}"
        )
        out = [*out, *new]
    return {"examples": _dump(out), "notes": notes, "stats": stats}


def _load_writer(location: str) -> tuple[Any, Any]:
    """The augmentation model: a local directory or a hub id (HF_TOKEN as for the base)."""
    import torch

    from kubetune.trainer.model import load_model, load_tokenizer

    model = load_model(location, None, dtype=torch.float32)
    model.eval()
    return model, load_tokenizer(location, None)
