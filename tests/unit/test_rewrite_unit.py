"""The pure parts of self-rewrite and augmentation: words and their overlap (case,
punctuation, empty text), the prompts (with and without a request), the acceptance rule
(each reason, boundaries, NaN), and the plan's sentence with its cost."""

from __future__ import annotations

import math

import pytest

from kubetune.data import Example, parse_jsonl
from kubetune.planning.remedies import augmentation_sentence, generations_per_example
from kubetune.trainer.remedies.rewrite import (
    _clean,
    accept_rewrite,
    distinct_words,
    paraphrase_prompt,
    rewrite_prompt,
    translate_prompt,
    with_target,
    word_overlap,
)

pytestmark = pytest.mark.unit


# ---- words -----------------------------------------------------------------------------------


def test_distinct_words_lower_cases_and_ignores_punctuation() -> None:
    assert distinct_words("The cat, the CAT; the cat!") == {"the", "cat"}
    assert distinct_words("Term 3 means item 3.") == {"term", "3", "means", "item"}


def test_distinct_words_of_empty_and_punctuation_only_text_is_empty() -> None:
    assert distinct_words("") == set()
    assert distinct_words("   \n\t") == set()
    assert distinct_words("...!?;:-—()") == set()


def test_distinct_words_keeps_inner_apostrophes_and_unicode_letters() -> None:
    assert distinct_words("Don't stop; l'été est là") == {"don't", "stop", "l'été", "est", "là"}
    assert distinct_words("It\u2019s IT\u2019S") == {"it\u2019s"}
    assert distinct_words("snake_case and hyphen-ated") == {"snake_case", "and", "hyphen", "ated"}


def test_word_overlap_is_the_share_of_the_originals_words_kept() -> None:
    assert word_overlap("a b c d", "a b x y z") == 0.5
    assert word_overlap("a b c d", "d c b a") == 1.0
    assert word_overlap("a b c d", "") == 0.0
    # Distinct words: repeats in the original count once.
    assert word_overlap("a a a b", "a") == 0.5


def test_word_overlap_ignores_case_and_punctuation() -> None:
    assert word_overlap("Hello, World!", "hello world") == 1.0
    assert word_overlap("HELLO world.", "...hello...") == 0.5


def test_word_overlap_is_not_symmetric() -> None:
    assert word_overlap("a b", "a b c d") == 1.0
    assert word_overlap("a b c d", "a b") == 0.5


def test_word_overlap_of_an_original_without_words_is_one() -> None:
    assert word_overlap("", "anything") == 1.0
    assert word_overlap("?!", "") == 1.0


# ---- prompts ---------------------------------------------------------------------------------


def _pc() -> Example:
    return Example(1, "What is term 3? ", "Term 3 means item 3.")


def test_rewrite_prompt_holds_the_request_and_the_reference_answer() -> None:
    p = rewrite_prompt(_pc())
    assert "What is term 3?" in p
    assert "Term 3 means item 3." in p
    assert "own words" in p
    assert p.index("What is term 3?") < p.index("Term 3 means item 3.")
    assert p.endswith("\n")


def test_rewrite_prompt_for_text_rows_with_an_empty_prompt() -> None:
    _, [ex] = parse_jsonl('{"text": "The river runs past the mill."}', "t.jsonl")
    assert ex.prompt == ""
    p = rewrite_prompt(ex)
    assert "The river runs past the mill." in p
    assert "own words" in p
    assert "Request" not in p


def test_rewrite_prompt_for_chat_rows_holds_the_conversation() -> None:
    line = (
        '{"messages": [{"role": "system", "content": "Be brief."}, '
        '{"role": "user", "content": "Capital of France?"}, '
        '{"role": "assistant", "content": "Paris."}]}'
    )
    _, [ex] = parse_jsonl(line, "c.jsonl")
    p = rewrite_prompt(ex)
    assert "Be brief." in p
    assert "Capital of France?" in p
    assert "Paris." in p


def test_paraphrase_and_translate_prompts() -> None:
    p = paraphrase_prompt(_pc())
    assert "What is term 3?" in p
    assert "Term 3 means item 3." in p
    assert "Paraphrase" in p
    assert "Request" not in paraphrase_prompt(Example(1, "", "Some text."))
    t = translate_prompt("  Hello there.  ", "French")
    assert "French" in t
    assert "Hello there." in t
    assert t.endswith("French translation:\n")


def test_with_target_replaces_the_response_and_the_last_chat_message() -> None:
    ex = _pc()
    new = with_target(ex, "Item 3 is what term 3 means.")
    assert (new.line, new.prompt, new.target) == (1, ex.prompt, "Item 3 is what term 3 means.")
    assert ex.target == "Term 3 means item 3."
    chat = Example(2, "user: hi\n", "hello", (("user", "hi"), ("assistant", "hello")))
    new_chat = with_target(chat, "hey")
    assert new_chat.messages == (("user", "hi"), ("assistant", "hey"))
    assert chat.messages[-1] == ("assistant", "hello")


def test_clean_strips_and_cuts_at_a_blank_line_unless_the_original_has_one() -> None:
    assert _clean("  answer.\n\nRequest: more", "one line") == "answer."
    assert _clean("para one.\n\npara two.", "a\n\nb") == "para one.\n\npara two."
    assert _clean("   ", "x") == ""


# ---- acceptance ------------------------------------------------------------------------------

ARGS = {"min_overlap": 0.3, "max_length_ratio": 1.5}


def test_accept_rewrite_accepts_a_good_rewrite() -> None:
    assert accept_rewrite(10.0, 5.0, 0.5, length_ratio=1.0, **ARGS) == (True, "accepted")


@pytest.mark.parametrize(
    ("original_ppl", "rewrite_ppl", "overlap", "ratio", "reason"),
    [
        (10.0, 5.0, 0.5, 0.0, "empty"),
        (10.0, 5.0, 0.0, 0.0, "empty"),  # empty wins over the other reasons
        (10.0, 5.0, 0.29, 1.0, "lowOverlap"),
        (10.0, 5.0, 0.5, 1.51, "tooLong"),
        (10.0, 10.0, 0.5, 1.0, "notLowerPerplexity"),  # strictly lower
        (10.0, 11.0, 0.5, 1.0, "notLowerPerplexity"),
        (10.0, math.nan, 0.5, 1.0, "notLowerPerplexity"),
        (math.nan, 5.0, 0.5, 1.0, "notLowerPerplexity"),
        (10.0, 5.0, math.nan, 1.0, "lowOverlap"),
        (10.0, 5.0, 0.5, math.nan, "empty"),
    ],
)
def test_accept_rewrite_rejects_with_the_reason(
    original_ppl: float, rewrite_ppl: float, overlap: float, ratio: float, reason: str
) -> None:
    assert accept_rewrite(original_ppl, rewrite_ppl, overlap, length_ratio=ratio, **ARGS) == (
        False,
        reason,
    )


def test_accept_rewrite_boundaries_are_inclusive() -> None:
    assert accept_rewrite(10.0, 9.99, 0.3, 0.3, 1.5, 1.5) == (True, "accepted")
    assert accept_rewrite(10.0, 9.99, 1.0, 1.0, 0.01, 1.0) == (True, "accepted")
    assert accept_rewrite(10.0, 9.99, 0.99, 1.0, 1.0, 1.0) == (False, "lowOverlap")


# ---- the plan's sentence ----------------------------------------------------------------------


def test_augmentation_sentence_names_counts_model_pivot_and_cost() -> None:
    s = augmentation_sentence(2, 1, "German", "hf://kubetune/tiny-llama-en")
    assert "2 paraphrases" in s
    assert "1 back-translation via German" in s
    assert "hf://kubetune/tiny-llama-en" in s
    assert "3 new rows per example" in s
    assert "4 generations per example" in s
    assert "evaluation is not augmented" in s


def test_augmentation_sentence_singular_and_one_kind_only() -> None:
    s = augmentation_sentence(1, 0, "French", "the base model")
    assert "1 paraphrase " in s
    assert "back-translation" not in s.split("Cost")[0]
    assert "1 generation per example" in s
    s = augmentation_sentence(0, 3, "French", "m")
    assert "paraphrase " not in s.split("Cost")[0]
    assert "3 back-translations via French" in s
    assert "6 generations per example" in s


def test_augmentation_sentence_when_nothing_is_asked() -> None:
    assert "off" in augmentation_sentence(0, 0, "French", "m")


def test_generations_per_example_counts_two_per_back_translation() -> None:
    assert generations_per_example(0, 0) == 0
    assert generations_per_example(3, 0) == 3
    assert generations_per_example(2, 4) == 10
