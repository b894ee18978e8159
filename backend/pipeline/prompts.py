"""Label phrases → Grounding DINO prompt chunks, and the token span of every phrase in its chunk.

Pure: the tokenizer is passed in. A plan is computed once per class set and reused for every image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from backend.errors import PromptTooLongError
from backend.pipeline.types import TextClass

SEPARATOR = "."


@dataclass(frozen=True, slots=True)
class PhraseSpan:
    """Where one phrase sits: tokens `start:stop` of row `chunk` of `PromptPlan.input_ids`."""

    class_index: int
    chunk: int
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class PromptPlan:
    """Tokenized prompt chunks for a class set.

    input_ids, attention_mask: (C, L) int64, one row per chunk, right-padded to the longest (L <= max tokens).
    token_class: (C, L) int64, the class index each token belongs to, -1 for [CLS]/[SEP]/'.'/padding;
        the lookup form of `spans`.
    spans: every phrase's token span; all spans of one class lie in one chunk.
    class_count: length of the `TextClass` sequence the plan was built from.
    unprompted: indexes of classes left with no phrase after normalisation (they are never detected).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_class: torch.Tensor
    spans: tuple[PhraseSpan, ...]
    class_count: int
    unprompted: tuple[int, ...]

    @property
    def chunk_count(self) -> int:
        return self.input_ids.shape[0]


def normalize_phrase(text: str) -> str:
    """Lower-case, remove '.' and '?' (the model's phrase separators), collapse whitespace."""
    return " ".join(text.lower().replace(".", "").replace("?", "").split())


def build_prompt_plan(classes: Sequence[TextClass], tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> PromptPlan:
    """Pack `classes` into prompts "p1 . p2 . … ." of at most `max_tokens` tokens ([CLS]/[SEP] included).

    Phrases are normalised; empty ones and repeats (within or across classes: the first class keeps a
    phrase) are dropped. Raises PromptTooLongError when one class cannot fit in a single prompt.
    """
    phrases = _unique_phrases(classes)
    costs = _token_costs(phrases, tokenizer)
    for index, cost in costs.items():
        if cost + 2 > max_tokens:
            raise PromptTooLongError(
                f"label {classes[index].name!r}: its phrases need {cost + 2} tokens, but the detector reads "
                f"at most {max_tokens} per prompt; shorten the label or drop some of its aliases"
            )
    chunks = _pack(costs, max_tokens - 2)  # [CLS] and [SEP] take 2
    texts = [" ".join(f"{p} {SEPARATOR}" for i in chunk for p in phrases[i]) for chunk in chunks]
    owners = [[i for i in chunk for _ in phrases[i]] for chunk in chunks]  # class of each phrase, in order
    encoded = tokenizer(texts, padding="longest", return_tensors="pt") if texts else _empty_encoding()
    if encoded["input_ids"].shape[1] > max_tokens:
        raise ValueError("the tokenizer counts a whole prompt longer than its phrases; it is not BERT-like")
    separator_id = tokenizer.convert_tokens_to_ids(SEPARATOR)
    if not isinstance(separator_id, int):  # a single token gives a single id
        raise ValueError(f"the tokenizer gives no single id for {SEPARATOR!r}")
    spans = tuple(
        span
        for row, phrase_classes in enumerate(owners)
        for span in _chunk_spans(row, phrase_classes, encoded["input_ids"][row], separator_id)
    )
    return PromptPlan(
        input_ids=encoded["input_ids"],
        attention_mask=encoded["attention_mask"],
        token_class=_token_class(encoded["input_ids"].shape, spans),
        spans=spans,
        class_count=len(classes),
        unprompted=tuple(i for i in range(len(classes)) if i not in phrases),
    )


def _unique_phrases(classes: Sequence[TextClass]) -> dict[int, list[str]]:
    """Class index → its normalised phrases, in class order; no empties, no repeats, no phrase-less class."""
    seen: set[str] = set()
    phrases: dict[int, list[str]] = {}
    for index, text_class in enumerate(classes):
        for phrase in map(normalize_phrase, text_class.phrases):
            if phrase and phrase not in seen:
                seen.add(phrase)
                phrases.setdefault(index, []).append(phrase)
    return phrases


def _token_costs(phrases: dict[int, list[str]], tokenizer: PreTrainedTokenizerBase) -> dict[int, int]:
    """Class index → tokens its phrases add to a prompt: word pieces plus one '.' per phrase."""
    flat = [(index, phrase) for index, members in phrases.items() for phrase in members]
    if not flat:
        return {}
    pieces = tokenizer([phrase for _, phrase in flat], add_special_tokens=False)["input_ids"]
    costs = dict.fromkeys(phrases, 0)
    for (index, _), ids in zip(flat, pieces, strict=True):
        costs[index] += len(ids) + 1
    return costs


def _pack(costs: dict[int, int], budget: int) -> list[list[int]]:
    """Greedy in class order: a class joins the last chunk if it fits in `budget` tokens, else opens one."""
    chunks: list[list[int]] = []
    used = 0
    for index, cost in costs.items():
        if not chunks or used + cost > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(index)
        used += cost
    return chunks


def _chunk_spans(row: int, phrase_classes: list[int], input_ids: torch.Tensor, separator_id: int) -> list[PhraseSpan]:
    """Spans between consecutive '.' ids of one chunk's `input_ids` (L,); the first starts after [CLS].

    phrase_classes: the class index of each phrase of the chunk, in prompt order.
    """
    separators = (input_ids == separator_id).nonzero().flatten().tolist()
    if len(separators) != len(phrase_classes):
        raise ValueError(
            f"the tokenizer made {len(separators)} '{SEPARATOR}' tokens for {len(phrase_classes)} phrases; "
            "it does not behave like Grounding DINO's BERT tokenizer"
        )
    starts = [1] + [position + 1 for position in separators[:-1]]
    return [
        PhraseSpan(class_index, row, start, stop)
        for class_index, start, stop in zip(phrase_classes, starts, separators, strict=True)
    ]


def _token_class(shape: torch.Size, spans: tuple[PhraseSpan, ...]) -> torch.Tensor:
    """(C, L) int64: each span's tokens hold its class index, all others -1."""
    token_class = torch.full(shape, -1, dtype=torch.int64)
    for span in spans:
        token_class[span.chunk, span.start : span.stop] = span.class_index
    return token_class


def _empty_encoding() -> dict[str, torch.Tensor]:
    """Zero chunks: no class had a usable phrase."""
    empty = torch.zeros((0, 0), dtype=torch.int64)
    return {"input_ids": empty, "attention_mask": empty}
