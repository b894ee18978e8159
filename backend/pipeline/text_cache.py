"""Grounding DINO's text features once per prompt plan: its BERT runs on a plan's C chunks once, not on every row.

The detector's forward rows are image x chunk (image-major), so the text backbone is given the plan's C token rows
repeated B times. transformers' GroundingDinoModel / MMGroundingDinoModel take no precomputed text features (their
forward always calls `self.text_backbone(input_ids, text_self_attention_masks, token_type_ids, position_ids)`), so
`TextFeatureCache` takes over that module's forward (its state dict, parameters and device moves stay
as they are): while a detector serves a plan (`serving`), it runs the real
backbone on the first C rows once, keeps that output, and answers every forward of that plan with it repeated
B times. Every input of the backbone is a function of the token ids (the masks and positions come from the ids,
the token types are zeros), so a plan's token ids are its key. Outside `serving` (anyone else calling the model)
the real backbone runs, as before. The module is never compiled (torch.compile runs it eagerly: a graph break).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

# Plans (label sets) whose text features are kept; each is C x L x 768 floats (a few hundred kB for BERT-base).
CACHED_PLANS = 16


@dataclass(frozen=True, slots=True)
class _Serving:
    """The plan a thread's forward is for: its key and its chunk count C."""

    key: bytes
    chunks: int


class TextFeatureCache:
    """The forward of a Grounding DINO family model's text backbone (BERT), its per-plan output kept (see the
    module). `inner` is the backbone's own forward."""

    def __init__(self, inner: Callable[..., Any], capacity: int = CACHED_PLANS) -> None:
        self.inner = inner
        self._capacity = capacity
        self._features: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()
        self.runs = 0  # how often the real backbone ran for a served plan (tests, bench)

    @contextmanager
    def serving(self, input_ids: torch.Tensor) -> Iterator[None]:
        """Within this block, forwards on this thread are for the plan whose chunk rows are `input_ids` (C, L)."""
        previous = getattr(self._local, "serving", None)
        key = bytes(str(tuple(input_ids.shape)), "ascii") + input_ids.cpu().numpy().tobytes()
        self._local.serving = _Serving(key, input_ids.shape[0])
        try:
            yield
        finally:
            self._local.serving = previous

    @torch.compiler.disable  # type: ignore[untyped-decorator]  # torch types it loosely
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """The backbone's output for `input_ids` (B*C, L): last_hidden_state (B*C, L, H) as the real one gives."""
        served: _Serving | None = getattr(self._local, "serving", None)
        # With autograd on, the kept (inference-mode) features could not be saved for backward: computed anew.
        if served is None or kwargs or input_ids.shape[0] % served.chunks or torch.is_grad_enabled():
            return self.inner(
                input_ids, attention_mask, token_type_ids, position_ids, return_dict=return_dict, **kwargs
            )
        hidden = self._features_for(served, input_ids, attention_mask, token_type_ids, position_ids)
        expanded = hidden.repeat(input_ids.shape[0] // served.chunks, 1, 1)
        if return_dict is False:
            return (expanded,)
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=expanded)

    def _features_for(
        self,
        served: _Serving,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """(C, L, H): the kept features of the served plan, or the real backbone's on its first C rows."""
        with self._lock:
            kept = self._features.get(served.key)
            if kept is not None:
                self._features.move_to_end(served.key)
                return kept
        rows = slice(0, served.chunks)

        def first(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[rows]

        output = self.inner(
            input_ids[rows], first(attention_mask), first(token_type_ids), first(position_ids), return_dict=True
        )
        hidden: torch.Tensor = output.last_hidden_state
        with self._lock:
            self.runs += 1
            self._features[served.key] = hidden
            while len(self._features) > self._capacity:
                self._features.popitem(last=False)
        return hidden


def install_text_cache(model: nn.Module) -> TextFeatureCache:
    """A TextFeatureCache as the forward of `model`'s (a *ForObjectDetection of the Grounding DINO family) text
    backbone, installed once; returns it. TypeError when the model has no `model.text_backbone`."""
    backbone = getattr(getattr(model, "model", None), "text_backbone", None)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"{type(model).__name__} has no model.text_backbone: not a Grounding DINO family model")
    installed = getattr(backbone.forward, "__self__", None)
    if isinstance(installed, TextFeatureCache):
        return installed
    cache = TextFeatureCache(backbone.forward)
    backbone.forward = cache.forward  # an instance attribute: nn.Module.__call__ finds it first
    return cache
