"""Two data-side remedies for tiny datasets, applied before training.

- Self-rewrite (self-output / self-distillation, arXiv:2501.14315; the SDFT idea): the base
  model rewrites each training response in its own words, given the original as reference.
  A rewrite replaces the original only when it keeps enough of the original's words, is not
  much longer, and is less surprising to the base model (lower perplexity), so training
  moves the model less far from what it knew.
- Augmentation: new training rows written by a model (the base model unless another is
  named): sampled paraphrases of each response and back-translations through a pivot
  language. Only the new rows are returned; the caller adds them to the training set, never
  to evaluation. Cost: one generation per paraphrase, two per back-translation.

The pure parts (word overlap, prompts, the acceptance rule, the plan's sentence) need no
torch; the rest imports torch and transformers when called.

Why one module of ~470 lines: self-rewrite and augmentation share the prompts, the
generation loop and the scoring; split, each half would import the other's internals.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kubetune.data import Example

_WORD = re.compile(r"\w+(?:['\u2019]\w+)*")  # inner straight or curly apostrophes

#: Decoding of sampled generations (paraphrases and back-translations).
TEMPERATURE = 0.9
TOP_P = 0.95
#: A pivot-language leg may take this many times the English tokens (English-centric
#: tokenizers split other languages into more pieces).
PIVOT_TOKEN_FACTOR = 2.0
#: Rows per generate() call.
BATCH_SIZE = 8


# ---- pure: words, prompts, acceptance ---------------------------------------------------------


def distinct_words(text: str) -> set[str]:
    """The distinct lower-cased words of `text` (letters, digits, inner apostrophes);
    punctuation and whitespace separate words and are not words."""
    return set(_WORD.findall(text.lower()))


def word_overlap(original: str, rewrite: str) -> float:
    """The share of the original's distinct words that the rewrite keeps (case-insensitive);
    1.0 when the original has no words (there is nothing to keep)."""
    words = distinct_words(original)
    if not words:
        return 1.0
    return len(words & distinct_words(rewrite)) / len(words)


def _request_and_reference(example: Example, what: str) -> str:
    """The example's request (when it has one) and its response as the reference."""
    prompt = example.prompt.strip()
    if prompt:
        return f"Request:\n{prompt}\n\nReference {what}:\n{example.target.strip()}\n\n"
    return f"Reference {what}:\n{example.target.strip()}\n\n"


def rewrite_prompt(example: Example) -> str:
    """The self-rewrite instruction: the example's prompt (if any), the original response
    as the reference, and an instruction to answer in the model's own words."""
    if example.prompt.strip():
        return (
            "Here is a request and a reference answer.\n\n"
            + _request_and_reference(example, "answer")
            + "Answer the request in your own words and style. Keep every fact of the "
            "reference answer and add nothing new.\nAnswer:\n"
        )
    return (
        "Here is a reference text.\n\n"
        + _request_and_reference(example, "text")
        + "Write the text again in your own words and style. Keep every fact and add "
        "nothing new.\nText:\n"
    )


def paraphrase_prompt(example: Example) -> str:
    """The augmentation instruction for one paraphrase of the example's response."""
    what = "answer" if example.prompt.strip() else "text"
    return (
        f"Paraphrase the reference {what}: say the same thing with different words.\n\n"
        + _request_and_reference(example, what)
        + "Paraphrase:\n"
    )


def translate_prompt(text: str, language: str) -> str:
    """The instruction to translate `text` into `language` (one leg of a back-translation)."""
    return (
        f"Translate the following text into {language}. Reply with the translation only.\n\n"
        f"Text:\n{text.strip()}\n\n{language} translation:\n"
    )


def accept_rewrite(
    original_ppl: float,
    rewrite_ppl: float,
    overlap: float,
    min_overlap: float,
    length_ratio: float,
    max_length_ratio: float,
) -> tuple[bool, str]:
    """Whether a rewrite replaces the original, and why (or why not): it must be non-empty
    (`length_ratio` > 0, rewrite tokens / original tokens), keep at least `min_overlap` of
    the original's words, be at most `max_length_ratio` as long, and have a strictly lower
    base-model perplexity than the original (NaN never is)."""
    if not length_ratio > 0:
        return False, "empty"
    if not overlap >= min_overlap:
        return False, "lowOverlap"
    if not length_ratio <= max_length_ratio:
        return False, "tooLong"
    if not rewrite_ppl < original_ppl:
        return False, "notLowerPerplexity"
    return True, "accepted"


def _clean(text: str, original: str) -> str:
    """A generation without surrounding whitespace, cut at its first blank line unless the
    original has blank lines itself (base models ramble on past the answer)."""
    text = text.strip()
    if "\n\n" not in original.strip() and "\n\n" in text:
        text = text.split("\n\n", 1)[0].strip()
    return text


def _norm(text: str) -> str:
    return " ".join(text.split())


def with_target(example: Example, target: str) -> Example:
    """The example with a new response (a chat row's last message too)."""
    messages = example.messages
    if messages:
        messages = (*messages[:-1], (messages[-1][0], target))
    return replace(example, target=target, messages=messages)


# ---- torch: generation and scoring -----------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """One generation: its instruction and the most tokens it may add."""

    prompt: str
    max_new_tokens: int


def _input_ids(tokenizer: Any, instruction: str) -> list[int]:
    """The instruction as the model's input: a user turn in its chat format when it has
    one, else plain text after the BOS token."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + list(tokenizer(instruction, add_special_tokens=False)["input_ids"])


def _context_limit(model: Any) -> int | None:
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) else None


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0


@contextmanager
def _seeded(seed: int | None, device: Any) -> Iterator[None]:
    """Seeds torch (CPU and the device) for the block and restores the previous random
    state afterwards, so that the caller's training RNG is untouched."""
    import torch

    dev = torch.device(device)
    devices = (
        [dev.index if dev.index is not None else torch.cuda.current_device()]
        if (dev.type == "cuda")
        else []
    )
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def _generate(
    model: Any,
    tokenizer: Any,
    jobs: Sequence[_Job],
    device: Any,
    *,
    sample: bool,
    seed: int | None,
    batch_size: int = BATCH_SIZE,
) -> list[str]:
    """The decoded continuation of each job, in order: left-padded batches, greedy or
    sampled (temperature TEMPERATURE, top-p TOP_P), each batch seeded from `seed` and its
    index so that the result depends on the seed only. A continuation stops at EOS and at
    its own job's token limit."""
    import torch

    from kubetune.diagnostics.probes import eval_mode

    pad = _pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    limit = _context_limit(model)
    out: list[str] = []
    with eval_mode(model):
        for b, start in enumerate(range(0, len(jobs), batch_size)):
            batch = jobs[start : start + batch_size]
            new = max(1, max(j.max_new_tokens for j in batch))
            prompts = [_input_ids(tokenizer, j.prompt) for j in batch]
            if limit is not None:  # keep the end of the instruction (where the task is)
                keep = max(1, limit - new)
                prompts = [p[-keep:] for p in prompts]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor(
                [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device
            )
            kwargs: dict[str, Any] = {
                "max_new_tokens": new,
                "pad_token_id": pad,
                "do_sample": sample,
            }
            if eos is not None:
                kwargs["eos_token_id"] = eos
            if sample:
                kwargs.update(temperature=TEMPERATURE, top_p=TOP_P, top_k=0)
            with _seeded(None if seed is None else seed * 100_003 + b, device):
                result = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            for job, row in zip(batch, result[:, width:].tolist(), strict=True):
                row = row[: max(0, job.max_new_tokens)]
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def target_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of a response (without special tokens)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def target_perplexities(
    model: Any, tokenizer: Any, examples: Sequence[Example], device: Any
) -> list[float]:
    """Per example, the base model's perplexity of its target given its own prompt: exp of
    the mean NLL over the target's tokens and EOS, exactly as the trainer's loss sees them
    (`kubetune.trainer.data.encode`); NaN when nothing of the target fits."""
    from kubetune.trainer.data import encode
    from kubetune.trainer.remedies.loss import row_token_nlls

    max_length = _context_limit(model) or 1 << 20
    rows = [encode(ex, tokenizer, max_length) for ex in examples]
    scorable = [i for i, r in enumerate(rows) if any(x != -100 for x in r["labels"][1:])]
    nlls = row_token_nlls(model, [rows[i] for i in scorable], device) if scorable else []
    out = [math.nan] * len(rows)
    for i, row_nll in zip(scorable, nlls, strict=True):
        out[i] = math.exp(min(sum(row_nll) / len(row_nll), 50.0))
    return out


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


# ---- self-rewrite -----------------------------------------------------------------------------


def rewrite_examples(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    device: Any,
    *,
    min_overlap: float,
    max_length_ratio: float,
    seed: int,
    max_examples: int | None = None,
) -> tuple[list[Example], dict[str, Any]]:
    """Each example with its response rewritten by the (base) model where the rewrite is
    accepted (`accept_rewrite`), else as it was; the input is not changed.

    Greedy generation of at most ceil(max_length_ratio x the original's tokens) tokens,
    then both responses are scored under the model given the example's own prompt. Only
    the first `max_examples` are tried. Stats: rewritten, kept, tried, the mean per-example
    perplexity of the tried examples' targets before and after (None when none could be
    scored), and the count of each reason."""
    todo = list(examples) if max_examples is None else list(examples)[: max(0, max_examples)]
    rest = list(examples)[len(todo) :]
    lengths = [target_tokens(tokenizer, ex.target) for ex in todo]
    jobs = [
        _Job(rewrite_prompt(ex), math.ceil(max_length_ratio * n))
        for ex, n in zip(todo, lengths, strict=True)
    ]
    raw = _generate(model, tokenizer, jobs, device, sample=False, seed=seed)
    candidates = [_clean(text, ex.target) for text, ex in zip(raw, todo, strict=True)]
    before = target_perplexities(model, tokenizer, todo, device)
    cand_examples = [with_target(ex, c) for ex, c in zip(todo, candidates, strict=True)]
    scorable = [i for i, c in enumerate(candidates) if c]
    scored = target_perplexities(model, tokenizer, [cand_examples[i] for i in scorable], device)
    cand_ppl = [math.nan] * len(todo)
    for i, ppl in zip(scorable, scored, strict=True):
        cand_ppl[i] = ppl
    out: list[Example] = []
    after: list[float] = []
    reasons: Counter[str] = Counter()
    for i, ex in enumerate(todo):
        cand = candidates[i]
        ratio = target_tokens(tokenizer, cand) / max(1, lengths[i])
        ok, why = accept_rewrite(
            before[i],
            cand_ppl[i],
            word_overlap(ex.target, cand),
            min_overlap,
            ratio,
            max_length_ratio,
        )
        reasons[why] += 1
        out.append(cand_examples[i] if ok else ex)
        after.append(cand_ppl[i] if ok else before[i])
    if rest:
        reasons["overMaxExamples"] += len(rest)
    rewritten = reasons["accepted"]
    stats: dict[str, Any] = {
        "rewritten": rewritten,
        "kept": len(examples) - rewritten,
        "tried": len(todo),
        "meanPerplexityBefore": _mean(before),
        "meanPerplexityAfter": _mean(after),
        "reasons": dict(reasons),
    }
    return out + rest, stats


# ---- augmentation -----------------------------------------------------------------------------


def load_augmentation_model(path: str, dtype: Any = None) -> tuple[Any, Any]:
    """The model and tokenizer in a local directory (`file://` allowed), from local files
    only, in eval mode; the tokenizer pads with EOS when it has no pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.trainer.config import TrainerConfigError

    location = Path(path.removeprefix("file://"))
    if not (location / "config.json").exists():
        raise TrainerConfigError(
            f"no model at {location}: expected a directory with config.json "
            "(spec.augmentation.modelUri)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(location), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(location), dtype=dtype, local_files_only=True
    )
    model.eval()
    return model, tokenizer


def _keep(text: str, seen: set[str], reasons: Counter[str]) -> bool:
    """Whether a generated response is a new row: not empty, not the original (in `seen`
    from the start) and not a repeat of an earlier one (whitespace-normalised)."""
    key = _norm(text)
    if not key:
        reasons["empty"] += 1
        return False
    if key in seen:
        reasons["duplicate"] += 1
        return False
    seen.add(key)
    return True


def augment_examples(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    device: Any,
    *,
    paraphrases: int,
    back_translations: int,
    pivot_language: str,
    seed: int,
    max_length_ratio: float = 1.5,
) -> tuple[list[Example], dict[str, Any]]:
    """New training rows only (never the originals): per example `paraphrases` sampled
    paraphrases of its response given its prompt, and `back_translations` sampled round
    trips through `pivot_language` (two generations each), all with the example's prompt.
    Deterministic for a seed. Empty outputs and repeats (of the original or of each other)
    are dropped.

    Stats: asked (rows asked for), produced, dropped (count by reason: empty, sameAsOriginal,
    duplicate, emptyPivot), generations (generate() rows run), and per kind asked/produced.
    """
    paraphrases, back_translations = max(0, paraphrases), max(0, back_translations)
    lengths = [max(1, target_tokens(tokenizer, ex.target)) for ex in examples]
    cap = [math.ceil(max_length_ratio * n) for n in lengths]
    para_jobs = [
        _Job(paraphrase_prompt(ex), cap[i])
        for i, ex in enumerate(examples)
        for _ in range(paraphrases)
    ]
    para = _generate(model, tokenizer, para_jobs, device, sample=True, seed=seed)
    there_jobs = [
        _Job(translate_prompt(ex.target, pivot_language), math.ceil(PIVOT_TOKEN_FACTOR * cap[i]))
        for i, ex in enumerate(examples)
        for _ in range(back_translations)
    ]
    there = _generate(model, tokenizer, there_jobs, device, sample=True, seed=seed + 1)
    owners = [i for i in range(len(examples)) for _ in range(back_translations)]
    pivots = [_clean(t, examples[i].target) for t, i in zip(there, owners, strict=True)]
    back_jobs = [
        _Job(translate_prompt(p, "English"), cap[i])
        for p, i in zip(pivots, owners, strict=True)
        if p
    ]
    back_iter = iter(_generate(model, tokenizer, back_jobs, device, sample=True, seed=seed + 2))
    back = [next(back_iter) if p else None for p in pivots]

    reasons: Counter[str] = Counter()
    produced = {"paraphrases": 0, "backTranslations": 0}
    new: list[Example] = []
    for i, ex in enumerate(examples):
        seen = {_norm(ex.target)}
        outputs: list[tuple[str, str | None]] = [
            ("paraphrases", p) for p in para[i * paraphrases : (i + 1) * paraphrases]
        ] + [
            ("backTranslations", b)
            for b in back[i * back_translations : (i + 1) * back_translations]
        ]
        for kind, text in outputs:
            if text is None:
                reasons["emptyPivot"] += 1
                continue
            cleaned = _clean(text, ex.target)
            if _norm(cleaned) == _norm(ex.target):
                reasons["sameAsOriginal"] += 1
                continue
            if _keep(cleaned, seen, reasons):
                produced[kind] += 1
                new.append(with_target(ex, cleaned))
    stats: dict[str, Any] = {
        "asked": len(examples) * (paraphrases + back_translations),
        "produced": len(new),
        "dropped": dict(reasons),
        "generations": len(para_jobs) + len(there_jobs) + len(back_jobs),
        "paraphrases": {"asked": len(para_jobs), "produced": produced["paraphrases"]},
        "backTranslations": {
            "asked": len(there_jobs),
            "produced": produced["backTranslations"],
            "pivotLanguage": pivot_language,
        },
    }
    return new, stats
