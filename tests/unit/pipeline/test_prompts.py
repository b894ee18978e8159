"""Label phrases → prompt chunks: limits, reachability of every label, aliases, normalisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from backend.errors import BackendError, PromptTooLongError
from backend.pipeline.prompts import PromptPlan, build_prompt_plan, normalize_phrase
from backend.pipeline.types import TextClass

MAX_TOKENS = 256
WORDS = ("zebra", "crossing", "red", "traffic", "cone", "wheelbarrow", "person", "bus", "stop", "sign")


@pytest.fixture(scope="module")
def tokenizer(tiny_detector_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_detector_dir)


def many_classes(count: int) -> list[TextClass]:
    """Distinct multi-word labels; words outside the tiny vocabulary cost one token per letter."""
    names = [f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7 + 3) % len(WORDS)]} {i}" for i in range(count)]
    return [TextClass(name=name.title(), phrases=(name,)) for name in names]


def span_text(plan: PromptPlan, tokenizer: PreTrainedTokenizerBase, index: int) -> list[str]:
    """The decoded text of each span of class `index`."""
    return [
        tokenizer.decode(plan.input_ids[span.chunk, span.start : span.stop])
        for span in plan.spans
        if span.class_index == index
    ]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Traffic Light", "traffic light"),
        ("  st. Bernard \t dog ", "st bernard dog"),
        ("What?", "what"),
        ("T-Shirt", "t-shirt"),
        (" .?. ", ""),
    ],
)
def test_normalize_phrase(raw: str, expected: str) -> None:
    assert normalize_phrase(raw) == expected


def test_150_labels_split_into_chunks_within_the_token_limit(tokenizer: PreTrainedTokenizerBase) -> None:
    plan = build_prompt_plan(many_classes(150), tokenizer, MAX_TOKENS)

    assert plan.chunk_count > 1
    assert plan.input_ids.shape[1] <= MAX_TOKENS
    assert plan.attention_mask.sum(dim=1).max() <= MAX_TOKENS
    assert plan.input_ids.shape == plan.attention_mask.shape == plan.token_class.shape


def test_every_label_is_reachable_through_its_span(tokenizer: PreTrainedTokenizerBase) -> None:
    classes = many_classes(150)
    plan = build_prompt_plan(classes, tokenizer, MAX_TOKENS)

    assert plan.class_count == 150 and plan.unprompted == ()
    for index, text_class in enumerate(classes):
        assert span_text(plan, tokenizer, index) == [text_class.phrases[0]]
    for span in plan.spans:
        assert 1 <= span.start < span.stop < int(plan.attention_mask[span.chunk].sum())


def test_spans_come_from_separator_positions(tokenizer: PreTrainedTokenizerBase) -> None:
    plan = build_prompt_plan([TextClass("Cat", ("cat",)), TextClass("Light", ("traffic light",))], tokenizer, 256)
    ids = plan.input_ids[0].tolist()

    separator = tokenizer.convert_tokens_to_ids(".")
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert [ids[span.stop] for span in plan.spans] == [separator, separator]
    assert plan.token_class[0].tolist() == [-1, 0, -1, 1, 1, -1, -1]


def test_aliases_map_to_one_class_in_one_chunk(tokenizer: PreTrainedTokenizerBase) -> None:
    aliased = [TextClass(f"Class {i}", (f"zebra {i}", f"wheelbarrow {i}", f"cone {i}")) for i in range(40)]
    plan = build_prompt_plan(aliased, tokenizer, MAX_TOKENS)

    assert plan.chunk_count > 1
    for index, text_class in enumerate(aliased):
        spans = [span for span in plan.spans if span.class_index == index]
        assert len({span.chunk for span in spans}) == 1
        assert span_text(plan, tokenizer, index) == list(text_class.phrases)
        for span in spans:
            assert (plan.token_class[span.chunk, span.start : span.stop] == index).all()


def test_special_tokens_and_padding_belong_to_no_class(tokenizer: PreTrainedTokenizerBase) -> None:
    plan = build_prompt_plan(many_classes(150), tokenizer, MAX_TOKENS)
    in_a_span = torch.zeros_like(plan.token_class, dtype=torch.bool)
    for span in plan.spans:
        in_a_span[span.chunk, span.start : span.stop] = True

    assert (plan.token_class[~in_a_span] == -1).all()
    assert (plan.token_class[in_a_span] >= 0).all()


def test_empty_and_repeated_phrases_are_dropped(tokenizer: PreTrainedTokenizerBase) -> None:
    classes = [
        TextClass("Cat", ("Cat", "cat.", "kitten")),
        TextClass("?", ("?", " ")),
        TextClass("Kitten", ("KITTEN", "kitty")),
    ]
    plan = build_prompt_plan(classes, tokenizer, MAX_TOKENS)

    assert span_text(plan, tokenizer, 0) == ["cat", "kitten"]
    assert span_text(plan, tokenizer, 1) == []
    assert span_text(plan, tokenizer, 2) == ["kitty"]  # the first class keeps a shared phrase
    assert plan.unprompted == (1,)


def test_no_usable_phrase_gives_an_empty_plan(tokenizer: PreTrainedTokenizerBase) -> None:
    plan = build_prompt_plan([TextClass("?", ("?",))], tokenizer, MAX_TOKENS)

    assert plan.chunk_count == 0 and plan.spans == () and plan.unprompted == (0,)


def test_a_class_longer_than_one_prompt_is_a_clear_error(tokenizer: PreTrainedTokenizerBase) -> None:
    too_long = TextClass("Essay", tuple(f"wheelbarrow number {i}" for i in range(20)))

    with pytest.raises(PromptTooLongError, match=r"'Essay'.*at most 256") as caught:
        build_prompt_plan([TextClass("Cat", ("cat",)), too_long], tokenizer, MAX_TOKENS)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, BackendError)
