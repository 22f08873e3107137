"""The small-data evidence: what fine-tuning a few hundred examples costs the base model, and
what kubetune's remedies and its Auto plan do about it.

Base model: kubetune's built-in `hf://kubetune/tiny-llama-en` (a ~1M-parameter Llama
pretrained by kubetune on the English text in kubetune/trainer/corpus/general-en.txt, written
for kubetune and shipped with it; built once and cached). Task: the quickstart's glossary of
the Mossbrook Herbal (examples/data/make_quickstart.py: 300 made-up definitions, text the
base model finds surprising; 40 held-out entries whose plant names never occur in training).

Each configuration is a real `kubetune.trainer` run (the recipe the operator runs, in this
process, on the CPU), with the same data, seed set and epoch ceiling:

- vanilla: Full fine-tuning, fixed epochs, no early stopping, the last weights kept.
- lora: plain LoRA (rank 8 on every linear layer) with early stopping, no remedies.
- full+replay / full+ewc / full+lowppl / full+hft / full+sam / full+rewrite: vanilla plus
  one remedy forced On; full+augment: vanilla plus one paraphrase per example written by the
  base model; full+kfold: vanilla with the epoch count chosen by 4-fold cross-validation.
- auto: `method: Auto` and every remedy Auto, with early stopping and the quickstart's
  learning rate (the planner picks LoRA for 300 examples with Full as the alternative the
  trainer switches to when the data is surprising for the base model).
- full+auto: `method: Full`, fixed epochs, every remedy Auto (what Auto adds to vanilla).

Measured on the final model, outside the trainer: held-out target perplexity (the 40
unseen entries), general-text perplexity ratio (the held-out English text
kubetune/trainer/corpus/general-en-heldout.txt, after / before: forgetting), memorisation
(kubetune.diagnostics: greedy continuation of 16 tokens after the prompt and 8 response
tokens, exact match; on 64 training entries and on the held-out baseline), and compute
(optimizer steps, training tokens, wall seconds).

    .venv/bin/python bench/small_data.py            # 3 seeds, appends to bench/RESULTS.md
    .venv/bin/python bench/small_data.py --smoke    # 1 seed, 60 examples, 1 epoch
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, header, record

BASE = "hf://kubetune/tiny-llama-en"
HELDOUT_GENERAL = ROOT / "kubetune" / "trainer" / "corpus" / "general-en-heldout.txt"
#: Learning rates for a one-million-parameter model (the planner's defaults are for
#: billion-parameter models; the quickstart sets 3e-3 for LoRA too).
FULL_LR = 1e-3
LORA_LR = 3e-3

OFF = {"mode": "Off"}
ALL_OFF = {
    "replay": OFF,
    "ewc": OFF,
    "lowPerplexityTargets": OFF,
    "halfFineTuning": OFF,
    "sam": OFF,
    "selfRewrite": OFF,
}


@dataclass(frozen=True)
class Config:
    name: str
    method: str
    lr: float
    early_stop: bool
    remedies: dict[str, Any]
    keep_last: bool = False
    #: Other spec fields (augmentation, hyperparameters.crossValidation).
    spec: dict[str, Any] = field(default_factory=dict)


CONFIGS = [
    Config("vanilla", "Full", FULL_LR, False, ALL_OFF, keep_last=True),
    Config("lora", "LoRA", LORA_LR, True, ALL_OFF),
    Config("full+replay", "Full", FULL_LR, False, {**ALL_OFF, "replay": {"mode": "On"}}, True),
    Config("full+ewc", "Full", FULL_LR, False, {**ALL_OFF, "ewc": {"mode": "On"}}, True),
    Config(
        "full+lowppl",
        "Full",
        FULL_LR,
        False,
        {**ALL_OFF, "lowPerplexityTargets": {"mode": "On"}},
        True,
    ),
    Config("full+hft", "Full", FULL_LR, False, {**ALL_OFF, "halfFineTuning": {"mode": "On"}}, True),
    Config("full+sam", "Full", FULL_LR, False, {**ALL_OFF, "sam": {"mode": "On"}}, True),
    Config(
        "full+rewrite",
        "Full",
        FULL_LR,
        False,
        {**ALL_OFF, "selfRewrite": {"mode": "On"}},
        True,
    ),
    Config(
        "full+augment",
        "Full",
        FULL_LR,
        False,
        ALL_OFF,
        True,
        {"augmentation": {"paraphrases": 1}},
    ),
    Config(
        "full+kfold",
        "Full",
        FULL_LR,
        False,
        ALL_OFF,
        True,
        {"hyperparameters": {"crossValidation": {"mode": "On", "folds": 4}}},
    ),
    Config("auto", "Auto", LORA_LR, True, {}),
    Config("full+auto", "Full", FULL_LR, False, {}, True),
]

#: Run only when named in --only: the Auto switch's run (Full, remedies Auto, early stopping)
#: at lower learning rates than the quickstart's 3e-3 (docs/evidence.md).
EXTRA_CONFIGS = [
    Config("switch@1e-3", "Full", 1e-3, True, {}),
    Config("switch@3e-4", "Full", 3e-4, True, {}),
]


def quickstart_rows() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    path = ROOT / "examples" / "data" / "make_quickstart.py"
    spec = importlib.util.spec_from_file_location("make_quickstart", path)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    train, val = mod.rows()
    return list(train), list(val)


@dataclass
class Result:
    config: str
    seed: int
    method: str = ""
    heldout_ppl: float = math.nan
    general_ratio: float = math.nan
    mem_train: float = math.nan
    mem_heldout: float = math.nan
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    remedies: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _plan(spec: Any, train_path: Path, val_path: Path) -> dict[str, Any]:
    """The planner's plan for the bench's base model, as JSON (the bench edits it)."""
    from kubetune.planning.job import build_plan
    from kubetune.trainer.basemodel import builtin_model_config

    return build_plan(
        spec,
        train_path.read_bytes(),
        str(train_path),
        builtin_model_config(BASE),
        BASE,
        (8.0, "bench"),
        validation_text=val_path.read_bytes(),
        validation_source=str(val_path),
    ).to_json()


def run_one(
    cfg: Config, seed: int, epochs: int, train_path: Path, val_path: Path, work: Path
) -> tuple[Result, Path]:
    from kubetune.api import parse_job
    from kubetune.api.plan import PlanDocument
    from kubetune.trainer.config import TrainerConfig
    from kubetune.trainer.recipe import run

    spec_dict: dict[str, Any] = {
        "model": {"uri": BASE},
        "dataset": {
            "uri": f"file://{train_path}",
            "validationUri": f"file://{val_path}",
            "format": "PromptCompletion",
        },
        "method": {"type": cfg.method},
        "hyperparameters": {
            "learningRate": cfg.lr,
            "epochs": epochs,
            "seed": seed,
            # No evaluation: no best checkpoint to go back to, the last weights (and an
            # epoch count chosen by the folds keeps it so).
            **({"evalSteps": 10**9} if cfg.keep_last else {}),
            **(cfg.spec.get("hyperparameters") or {}),
        },
        "resources": {"numNodes": 1, "gpusPerNode": 0},
        "earlyStopping": {"enabled": cfg.early_stop},
        "diagnostics": {"enabled": False},
        "remedies": cfg.remedies,
        **{k: v for k, v in cfg.spec.items() if k != "hyperparameters"},
    }
    spec = parse_job(
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": cfg.name.replace("+", "-")},
            "spec": spec_dict,
        }
    ).spec
    plan = _plan(spec, train_path, val_path)
    if cfg.keep_last:  # no evaluation: no best checkpoint to go back to, the last weights
        plan["hyperparameters"]["evalSteps"] = 10**9
    out = work / f"{cfg.name}-{seed}"
    trainer_cfg = TrainerConfig(
        spec=spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
        plan=PlanDocument.model_validate(plan),
        model=BASE,
        dataset=str(train_path),
        validation=str(val_path),
        output=out,
        metrics_port=-1,
        termination_path=work / "termination.json",
    )
    result = Result(cfg.name, seed, method=str(plan["method"]))
    started = time.perf_counter()
    try:
        run(trainer_cfg)
    except Exception as exc:  # a failed configuration is a row, not the end of the bench
        result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result, out
    result.seconds = time.perf_counter() - started
    # The method trained (Auto may switch it at training start): the run's plan.json.
    result.method = str(json.loads((out / "plan.json").read_text())["method"])
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    result.steps = int((summary.get("progress") or {}).get("step") or 0)
    hp = plan["hyperparameters"]
    rows = [r for r in report["history"] if r.get("train_loss") is not None]
    result.tokens = int(result.steps * int(hp.get("effectiveBatchSize") or 1) * _mean_tokens())
    del rows
    result.remedies = {
        k: bool(v.get("on")) for k, v in (summary.get("remedies") or {}).items() if "on" in v
    }
    return result, out


_MEAN_TOKENS: list[float] = []


def _mean_tokens() -> float:
    return _MEAN_TOKENS[0] if _MEAN_TOKENS else 0.0


def measure(result: Result, out: Path, val_path: Path, train_path: Path, base: Any) -> None:
    """Held-out target perplexity, general-text ratio and memorisation of the final model."""
    from kubetune.diagnostics.probes import memorization, sample_rows, token_nlls

    model = _load_final(out / "final")
    val_rows, train_rows, general_rows = base["val_rows"], base["train_rows"], base["general"]
    nll = token_nlls(model, val_rows, "cpu")
    result.heldout_ppl = math.exp(sum(nll) / len(nll))
    g = token_nlls(model, general_rows, "cpu")
    result.general_ratio = math.exp(sum(g) / len(g)) / base["general_ppl"]
    kw: dict[str, Any] = {
        "k": 8,
        "m": 16,
        "near_distance": 0.1,
        "pad_id": base["pad_id"],
        "device": "cpu",
    }
    result.mem_train = memorization(model, sample_rows(train_rows, 64, 0), **kw).exact_rate
    result.mem_heldout = memorization(model, val_rows, **kw).exact_rate


def _load_final(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.model import model_location

    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(model_location(BASE)[0])
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(str(path))


def baseline(train_path: Path, val_path: Path) -> dict[str, Any]:
    """The base model's figures and the tokenised evaluation sets."""
    from transformers import AutoModelForCausalLM

    from kubetune.data import parse_jsonl
    from kubetune.diagnostics.probes import memorization, sample_rows, text_rows, token_nlls
    from kubetune.trainer.data import TokenizedDataset
    from kubetune.trainer.model import load_tokenizer, model_location

    location = model_location(BASE)[0]
    tok = load_tokenizer(location)
    model = AutoModelForCausalLM.from_pretrained(location)
    _, train = parse_jsonl(train_path.read_bytes(), str(train_path), "PromptCompletion")
    _, val = parse_jsonl(val_path.read_bytes(), str(val_path), "PromptCompletion")
    train_rows = TokenizedDataset(train, tok, 256).rows
    val_rows = TokenizedDataset(val, tok, 256).rows
    _MEAN_TOKENS[:] = [sum(len(r["input_ids"]) for r in train_rows) / len(train_rows)]
    general = text_rows(HELDOUT_GENERAL.read_text(), tok, 256, 8192)
    g = token_nlls(model, general, "cpu")
    v = token_nlls(model, val_rows, "cpu")
    d = token_nlls(model, train_rows, "cpu")
    kw: dict[str, Any] = {
        "k": 8,
        "m": 16,
        "near_distance": 0.1,
        "pad_id": int(tok.pad_token_id),
        "device": "cpu",
    }
    return {
        "general": general,
        "val_rows": val_rows,
        "train_rows": train_rows,
        "pad_id": int(tok.pad_token_id),
        "general_ppl": math.exp(sum(g) / len(g)),
        "heldout_ppl": math.exp(sum(v) / len(v)),
        "data_ppl": math.exp(sum(d) / len(d)),
        "mem_train": memorization(model, sample_rows(train_rows, 64, 0), **kw).exact_rate,
    }


def _mean_sd(values: list[float]) -> str:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3g}"
    return f"{statistics.mean(vals):.3g} ± {statistics.stdev(vals):.2g}"


def table(results: list[Result], base: dict[str, Any]) -> tuple[str, dict[str, dict[str, float]]]:
    names = [c.name for c in [*CONFIGS, *EXTRA_CONFIGS] if any(r.config == c.name for r in results)]
    means: dict[str, dict[str, float]] = {}
    lines = [
        "| configuration | method | held-out target ppl | general ppl ratio | "
        "memorised (train) | memorised (held-out) | steps | train tokens | seconds | "
        "remedies on |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| base model | - | {base['heldout_ppl']:.3g} | 1 | {base['mem_train']:.2f} | - | 0 "
        "| 0 | 0 | - |",
    ]
    for name in names:
        rs = [r for r in results if r.config == name and r.error is None]
        errs = [r for r in results if r.config == name and r.error is not None]
        if not rs:
            lines.append(f"| {name} | failed: {errs[0].error} |||||||||")
            continue
        means[name] = {
            "heldout_ppl": statistics.mean(r.heldout_ppl for r in rs),
            "general_ratio": statistics.mean(r.general_ratio for r in rs),
            "mem_train": statistics.mean(r.mem_train for r in rs),
            "mem_heldout": statistics.mean(r.mem_heldout for r in rs),
            "seconds": statistics.mean(r.seconds for r in rs),
            "tokens": statistics.mean(r.tokens for r in rs),
        }
        on = sorted({k for r in rs for k, v in r.remedies.items() if v})
        lines.append(
            f"| {name} | {rs[0].method} | {_mean_sd([r.heldout_ppl for r in rs])} | "
            f"{_mean_sd([r.general_ratio for r in rs])} | "
            f"{_mean_sd([r.mem_train for r in rs])} | {_mean_sd([r.mem_heldout for r in rs])} | "
            f"{statistics.mean(r.steps for r in rs):.0f} | "
            f"{statistics.mean(r.tokens for r in rs):,.0f} | "
            f"{_mean_sd([r.seconds for r in rs])} | {', '.join(on) or '-'} |"
        )
    return "\n".join(lines), means


def goals(means: dict[str, dict[str, float]]) -> str:
    v = means.get("vanilla")
    if not v:
        return "goals: not evaluated (no vanilla row)"
    lines = []
    for name in ("auto", "full+auto"):
        a = means.get(name)
        if not a:
            continue
        rise_v, rise_a = v["general_ratio"] - 1, a["general_ratio"] - 1
        ppl_ok = a["heldout_ppl"] <= v["heldout_ppl"]
        ppl_10 = a["heldout_ppl"] <= 1.10 * v["heldout_ppl"]
        forget_half = rise_a <= rise_v / 2
        mem_half = a["mem_train"] <= v["mem_train"] / 2
        lines += [
            f"- issue 9 ({name}): general-perplexity rise {rise_a:+.3f} vs vanilla's "
            f"{rise_v:+.3f} ({'at least halved' if forget_half else 'NOT halved'}), held-out "
            f"target perplexity {a['heldout_ppl']:.3g} vs {v['heldout_ppl']:.3g} "
            f"({'within' if ppl_10 else 'NOT within'} 10%): "
            f"{'MET' if forget_half and ppl_10 else 'MISSED'}",
            f"- issue 7 ({name}): held-out perplexity "
            + ("matches or beats" if ppl_ok else "is worse than")
            + " vanilla's; forgetting "
            + ("halved" if forget_half else "not halved")
            + f"; memorisation {a['mem_train']:.2f} vs {v['mem_train']:.2f} "
            + ("(halved): " if mem_half else "(not halved): ")
            + ("MET" if ppl_ok and forget_half and mem_half else "MISSED"),
        ]
    return "\n".join(lines)


def plot(results: list[Result], base: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, c in enumerate([*CONFIGS, *EXTRA_CONFIGS]):
        rs = [r for r in results if r.config == c.name and r.error is None]
        if not rs:
            continue
        xs = [r.general_ratio for r in rs]
        ys = [r.heldout_ppl for r in rs]
        color = f"C{i}"
        ax.scatter(xs, ys, color=color, alpha=0.35, s=18)
        ax.scatter([statistics.mean(xs)], [statistics.mean(ys)], color=color, s=80, label=c.name,
                   edgecolors="black")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("general-text perplexity ratio (after / base): forgetting")
    ax.set_ylabel("held-out target perplexity")
    ax.set_title("tiny-llama-en, Mossbrook glossary (dots: seeds; rings: means)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "evidence-small-data.png"))
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("KUBETUNE_METRICS_HOST", "127.0.0.1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    import torch

    # One thread: on a shared 2-core machine two threads per process run ~10x slower.
    torch.set_num_threads(1)
    seeds = [1] if args.smoke else list(range(1, args.seeds + 1))
    epochs = 1 if args.smoke else args.epochs
    train, val = quickstart_rows()
    if args.smoke:
        train, val = train[:40], val[:8]
    only = {s for s in args.only.split(",") if s}
    configs = [c for c in CONFIGS if not only or c.name in only]
    configs += [c for c in EXTRA_CONFIGS if c.name in only]
    with tempfile.TemporaryDirectory(prefix="kubetune-small-data-") as tmp:
        work = Path(tmp)
        train_path, val_path = work / "train.jsonl", work / "validation.jsonl"
        train_path.write_text("".join(json.dumps(r) + "\n" for r in train))
        val_path.write_text("".join(json.dumps(r) + "\n" for r in val))
        base = baseline(train_path, val_path)
        results: list[Result] = []
        for seed in seeds:
            for cfg in configs:
                result, out = run_one(cfg, seed, epochs, train_path, val_path, work)
                if result.error is None:
                    measure(result, out, val_path, train_path, base)
                results.append(result)
                print(
                    f"{cfg.name} seed {seed}: held-out ppl {result.heldout_ppl:.3g}, general "
                    f"ratio {result.general_ratio:.3g}, memorised {result.mem_train:.2f}, "
                    f"{result.seconds:.0f} s {result.error or ''}",
                    flush=True,
                )
    text, means = table(results, base)
    section = (
        header("Small-data evidence (bench/small_data.py)")
        + f"- data: Mossbrook glossary, {len(train)} training and {len(val)} held-out entries; "
        f"{len(seeds)} seed(s); at most {epochs} epoch(s); base model {BASE} (training-data "
        f"perplexity {base['data_ppl']:.3g}, general-text perplexity "
        f"{base['general_ppl']:.3g})\n\n" + text + "\n\n" + goals(means) + "\n"
    )
    record(section, enabled=not (args.smoke or args.no_record))
    if not args.smoke and args.plot:
        plot(results, base, Path(args.plot))
        (Path(args.plot).with_suffix(".json")).write_text(
            json.dumps([r.__dict__ for r in results], indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
