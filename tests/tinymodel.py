"""A tiny Llama with its own BPE tokenizer, built locally in seconds (no hub), briefly
pretrained on related text so that LoRA has something to adapt. Shared by the trainer and
cluster tiers."""

from __future__ import annotations

from pathlib import Path


def rows(n: int, start: int = 0) -> list[dict[str, str]]:
    return [
        {"prompt": f"Define term {i}: ", "completion": f"Term {i} means item {i}."}
        for i in range(start, start + n)
    ]


WORDS = ("amber", "brook", "cedar", "dune", "ember", "fjord", "grove", "heath", "inlet", "juniper")


def random_rows(n: int, seed: int, words: int = 12) -> list[dict[str, str]]:
    """Prompts whose completions are random word strings: learnable only by heart, so a
    run on them can only memorise (and overfits)."""
    import random

    rng = random.Random(seed)
    return [
        {
            "prompt": f"Define term {i}: ",
            "completion": " ".join(rng.choice(WORDS) for _ in range(words)) + ".",
        }
        for i in range(n)
    ]


def build_tiny_model(out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    text = " ".join(r["prompt"] + r["completion"] for r in rows(400))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [text],
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(out)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    import torch

    # "Pretrain" briefly on related text so that the base knows the words and LoRA has
    # something to adapt (LoRA on a random base learns very slowly).
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    corpus = [f"Term {i} refers to object {i}. Name {i} is thing {i}." for i in range(400, 800)]
    batch_ids = [fast(t)["input_ids"] for t in corpus]
    width = max(len(x) for x in batch_ids)
    ids = torch.tensor([x + [fast.pad_token_id] * (width - len(x)) for x in batch_ids])
    labels = ids.masked_fill(ids == fast.pad_token_id, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        sel = torch.randint(0, len(ids), (32,))
        loss = model(input_ids=ids[sel], labels=labels[sel]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out
