"""Built-in base models: tiny causal language models that kubetune pretrains once, on this
machine, from the general English corpus that ships with it (`kubetune/trainer/corpus/`),
and caches. They give the quickstart and the tests a base model that already knows some
English without any download.

`resolve_model("hf://kubetune/tiny-llama-en")` returns a standard Hugging Face model
directory (`config.json`, `model.safetensors`, `generation_config.json`, `tokenizer.json`,
`tokenizer_config.json`, ...) that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load. The directory lives in
`$KUBETUNE_MODEL_CACHE` or `~/.cache/kubetune/models` (or the `cache_dir` argument) under
`<name>-<recipe hash>`; the hash covers the model shape, the training settings and the
corpus bytes, so any change builds a new model. Several processes (torchrun ranks) may ask
at once: one builds under a file lock into a temporary directory and renames it into place,
the others wait and reuse it.

Why one module of ~450 lines: a built-in model's recipe, tokenizer, pretraining and cache
key are one unit; the cache key hashes the recipe, so they change together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.contract import Env

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BUILTIN_PREFIX = "hf://kubetune/"
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
# Bump when the build code changes in a way that changes the weights.
RECIPE_FORMAT = 1
# Written last into a finished model directory: the recipe, its hash and the measurements.
RECIPE_FILE = "kubetune-recipe.json"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# The tokenizer's first ids, in this order.
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, *ROLE_TOKENS)
SPECIAL_IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
# Each message is "<|role|>\n{content}</s>\n"; a generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Recipe:
    """How one built-in model is made. Every field except `description` and
    `expected_seconds` is part of the recipe hash."""

    name: str
    description: str
    # Model shape (a LlamaConfig with tied input/output embeddings).
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    max_positions: int
    # Pretraining: random windows of `seq_len` tokens from the corpus stream.
    steps: int
    seq_len: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    seed: int
    threads: int
    corpus: str = "general-en.txt"
    heldout: str = "general-en-heldout.txt"
    # Only for the log line: the build time on 2 CPU cores.
    expected_seconds: int = 60

    def hashed_fields(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        for key in ("description", "expected_seconds", "heldout"):
            fields.pop(key)
        return fields


BUILTIN_MODELS: dict[str, Recipe] = {
    "tiny-llama-en": Recipe(
        name="tiny-llama-en",
        description=(
            "A 4-layer Llama (about 1M parameters, 1024-token byte-level BPE) pretrained on "
            "kubetune's 50 KB general English corpus: it writes English-like sentences about "
            "everyday topics."
        ),
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        vocab_size=1024,
        max_positions=512,
        steps=200,
        seq_len=128,
        batch_size=16,
        learning_rate=3e-3,
        warmup_steps=20,
        weight_decay=0.05,
        seed=0,
        threads=1,  # 2 threads were 10x slower than 1 on a busy 2-core machine
        expected_seconds=60,
    ),
}


class UnknownBuiltinModel(ValueError):
    """A `hf://kubetune/...` id that names no built-in model."""


def is_builtin(uri: str) -> bool:
    """Whether `uri` names a model kubetune builds itself (`hf://kubetune/<name>`)."""
    return uri.startswith(BUILTIN_PREFIX)


def builtin_recipe(uri: str) -> Recipe:
    """The recipe behind a built-in model id."""
    if not is_builtin(uri):
        raise UnknownBuiltinModel(f"{uri} is not a built-in model (they start {BUILTIN_PREFIX})")
    name = uri.removeprefix(BUILTIN_PREFIX).strip("/")
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        known = ", ".join(BUILTIN_PREFIX + n for n in sorted(BUILTIN_MODELS))
        raise UnknownBuiltinModel(
            f"{uri} is not a built-in model; the built-in models are: {known}"
        ) from None


def corpus_text(filename: str) -> str:
    return (CORPUS_DIR / filename).read_text(encoding="utf-8")


def recipe_hash(recipe: Recipe) -> str:
    """12 hex digits over everything that shapes the model directory: the recipe, the corpus
    bytes, the tokenizer's special tokens and chat template, and the build format."""
    payload = {
        "format": RECIPE_FORMAT,
        "recipe": recipe.hashed_fields(),
        "special_tokens": SPECIAL_TOKENS,
        "chat_template": CHAT_TEMPLATE,
        "corpus_sha256": hashlib.sha256((CORPUS_DIR / recipe.corpus).read_bytes()).hexdigest(),
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def default_cache_dir() -> Path:
    """`$KUBETUNE_MODEL_CACHE`, else `$XDG_CACHE_HOME/kubetune/models` (`~/.cache/...`)."""
    if env := os.environ.get(Env.MODEL_CACHE):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kubetune" / "models"


def paragraphs(text: str) -> list[str]:
    """The documents of a corpus: paragraphs separated by blank lines."""
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def build_tokenizer(
    text: str, vocab_size: int, *, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `text`, with `<s>`, `</s>`, `<pad>`, `<unk>`
    and the chat role tokens as special tokens and a chat template. It adds no special
    tokens by itself (callers add `<s>`/`</s>` as they need them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(paragraphs(text) or [text], trainer=trainer)
    # Called through Any: transformers leaves the constructor unannotated.
    fast_cls: Any = PreTrainedTokenizerFast
    tokenizer: PreTrainedTokenizerFast = fast_cls(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    return tokenizer


def model_config(recipe: Recipe) -> dict[str, Any]:
    """The model's `config.json` essentials (a Llama), known before anything is built, so a
    planner can size the model without torch. The embedding has `recipe.vocab_size` rows;
    the tokenizer never has more tokens than that."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": recipe.vocab_size,
        "hidden_size": recipe.hidden_size,
        "intermediate_size": recipe.intermediate_size,
        "num_hidden_layers": recipe.num_layers,
        "num_attention_heads": recipe.num_heads,
        "num_key_value_heads": recipe.num_heads,
        "max_position_embeddings": recipe.max_positions,
        "tie_word_embeddings": True,
        "unk_token_id": SPECIAL_IDS[UNK],
        "bos_token_id": SPECIAL_IDS[BOS],
        "eos_token_id": SPECIAL_IDS[EOS],
        "pad_token_id": SPECIAL_IDS[PAD],
        "attention_dropout": 0.0,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "float32",
    }


def builtin_model_config(uri: str) -> dict[str, Any]:
    """`model_config` of a built-in model id (no torch, nothing built)."""
    return model_config(builtin_recipe(uri))


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _mean_loss(model: Any, stream: Any, seq_len: int) -> float:
    """The loss over consecutive `seq_len` windows of a token stream."""
    import torch

    losses: list[float] = []
    with torch.no_grad():
        for start in range(0, max(1, len(stream) - 1), seq_len):
            window = stream[start : start + seq_len + 1][:-1].unsqueeze(0)
            if window.shape[1] < 2:
                break
            losses.append(float(model(input_ids=window, labels=window).loss))
    return sum(losses) / len(losses) if losses else float("nan")


def pretrain(
    out_dir: Path,
    *,
    steps: int,
    seed: int = 0,
    recipe: Recipe | None = None,
    text: str | None = None,
    heldout_text: str | None = None,
    log: Log = _stderr,
) -> dict[str, float]:
    """Train a tokenizer and a Llama from scratch on the corpus and save both to `out_dir`.

    `recipe` gives the shape and training settings (default: tiny-llama-en's), `steps` and
    `seed` override its. Deterministic given the seed (fixed torch threads). Returns
    `first_loss`, `last_loss` (mean of the last 10 steps), `heldout_loss` (NaN without a
    held-out text), `parameters`, `corpus_tokens`, `steps` and `seconds`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    recipe = recipe or BUILTIN_MODELS["tiny-llama-en"]
    text = corpus_text(recipe.corpus) if text is None else text
    if heldout_text is None and (CORPUS_DIR / recipe.heldout).exists():
        heldout_text = corpus_text(recipe.heldout)
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)

    with _torch_threads(recipe.threads):
        tokenizer = build_tokenizer(text, recipe.vocab_size, model_max_length=recipe.max_positions)
        if len(tokenizer) > recipe.vocab_size:  # cannot happen: BPE stops at vocab_size
            raise RuntimeError(f"the tokenizer has {len(tokenizer)} > {recipe.vocab_size} tokens")

        def stream_of(corpus: str) -> torch.Tensor:
            ids: list[int] = []
            for para in paragraphs(corpus):
                body = tokenizer(para, add_special_tokens=False, verbose=False)["input_ids"]
                ids += [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
            return torch.tensor(ids, dtype=torch.long)

        stream = stream_of(text)
        seq_len = min(recipe.seq_len, len(stream) - 1)
        if seq_len < 8:
            raise ValueError("the pretraining corpus is too short (fewer than 9 tokens)")

        torch.manual_seed(seed)
        config = {
            k: v
            for k, v in model_config(recipe).items()
            if k not in ("model_type", "architectures", "torch_dtype")
        }
        model: Any = LlamaForCausalLM(LlamaConfig(**config))
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": recipe.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=recipe.learning_rate,
            betas=(0.9, 0.95),
        )
        warmup = min(recipe.warmup_steps, max(1, steps // 10))

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, steps - warmup)
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        generator = torch.Generator().manual_seed(seed)
        offsets = torch.arange(seq_len)
        losses: list[float] = []
        report_every = max(1, steps // 5)
        for step in range(steps):
            starts = torch.randint(
                0, len(stream) - seq_len, (recipe.batch_size,), generator=generator
            )
            batch = stream[starts[:, None] + offsets]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if (step + 1) % report_every == 0 or step == 0:
                log(
                    f"  {recipe.name}: step {step + 1}/{steps}, loss {losses[-1]:.3f} "
                    f"({time.monotonic() - started:.0f} s)"
                )

        model.eval()
        heldout_loss = (
            _mean_loss(model, stream_of(heldout_text), seq_len) if heldout_text else float("nan")
        )
        generation_config: Any = GenerationConfig
        model.generation_config = generation_config(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)

    tail = losses[-min(10, len(losses)) :]
    return {
        "first_loss": losses[0] if losses else float("nan"),
        "last_loss": sum(tail) / len(tail) if tail else float("nan"),
        "heldout_loss": heldout_loss,
        "parameters": float(n_params),
        "corpus_tokens": float(len(stream)),
        "steps": float(steps),
        "seconds": time.monotonic() - started,
    }


@contextlib.contextmanager
def _exclusive(lock_path: Path, waiting: Callable[[], None]) -> Iterator[None]:
    with lock_path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def resolve_model(uri: str, cache_dir: Path | None = None, *, log: Log = _stderr) -> Path:
    """The local directory of a built-in model, built on first use and cached.

    Safe to call from several processes at once: one builds, the others wait for it."""
    recipe = builtin_recipe(uri)
    root = (cache_dir or default_cache_dir()).expanduser()
    dirname = f"{recipe.name}-{recipe_hash(recipe)}"
    final = root / dirname
    if (final / RECIPE_FILE).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(
        root / f".{dirname}.lock",
        lambda: log(f"waiting for another process to build the base model {recipe.name}..."),
    ):
        if (final / RECIPE_FILE).is_file():
            return final
        # Leftovers of a build that died: nobody else builds this model while we hold the lock.
        for stale in root.glob(f".{dirname}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        log(
            f"building the built-in base model {recipe.name} once (about "
            f"{recipe.expected_seconds} s on 2 CPU cores); it is cached in {final}"
        )
        tmp = Path(tempfile.mkdtemp(prefix=f".{dirname}.tmp-", dir=root))
        try:
            metrics = pretrain(tmp, steps=recipe.steps, seed=recipe.seed, recipe=recipe, log=log)
            meta = {
                "uri": BUILTIN_PREFIX + recipe.name,
                "recipe_hash": recipe_hash(recipe),
                "recipe": dataclasses.asdict(recipe),
                "metrics": metrics,
            }
            (tmp / RECIPE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            tmp.chmod(0o755)  # mkdtemp makes it private
            if final.exists():  # an incomplete directory from an older layout
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(
            f"built {recipe.name} in {metrics['seconds']:.0f} s: "
            f"{metrics['parameters'] / 1e6:.2f}M parameters, loss "
            f"{metrics['first_loss']:.2f} -> {metrics['last_loss']:.2f} "
            f"(held-out {metrics['heldout_loss']:.2f})"
        )
    return final
