"""The frozen backbone's decode step over a fixed-length key/value cache, compiled once with ``torch.compile``.

At batch 1 on a CPU the eager step spends most of its time in Python and per-operator dispatch, not in arithmetic.
transformers' :class:`~transformers.StaticCache` gives every one-token step the same shapes (the cache and the
attention mask are allocated at their final length), so the step compiles once (inductor, with its C++ wrapper and
frozen weights) and is replayed for every token of every later batch of the same size and length bucket. The prompt
itself runs eagerly: its length varies from batch to batch.

Compiling takes about a minute on 2 CPU cores, so it pays for sweeps and long sessions, not for one short answer;
it is off unless asked for (``compile=True`` in :func:`~paretoalign.generation.generate`, ``--compile`` in the CLI).
"""

from __future__ import annotations

import weakref

import torch
from transformers import PreTrainedModel, StaticCache

from .backbone import cache_kwargs
from .blocks import position_ids_from_mask
from .files import is_int

LENGTH_BUCKET = 128  # cache lengths are rounded up to a multiple of this, so prompts of similar length share a compile
COMPILE_OPTIONS = {"cpp_wrapper": True, "freezing": True}  # inductor: less Python per step, weights folded as constants

# One compiled step per backbone (torch.compile re-specialises it per shape); weak keys: an entry goes with its backbone.
_compiled_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _make_step(backbone: PreTrainedModel):
    """The backbone's block stack over new tokens, writing into a static cache: ``(cache, tokens, mask, positions,
    cache_position) -> (B, T, d)`` final hidden states. The cache's keyword is resolved here, outside any compiled code."""
    stack = backbone.base_model
    keyword = next(iter(cache_kwargs(type(stack).forward, None)))

    def step(cache, tokens, attention_mask, positions, cache_position) -> torch.Tensor:
        out = stack(
            input_ids=tokens,
            attention_mask=attention_mask,
            position_ids=positions,
            cache_position=cache_position,
            use_cache=True,
            **{keyword: cache},
        )
        return out.last_hidden_state

    return step


def compiled_step(backbone: PreTrainedModel):
    """The compiled one-token step for ``backbone`` (built once per backbone and process)."""
    if backbone not in _compiled_steps:
        _compiled_steps[backbone] = torch.compile(_make_step(backbone), dynamic=False, options=COMPILE_OPTIONS)
    return _compiled_steps[backbone]


class StaticBackbone:
    """Final hidden states of a frozen backbone while decoding, over a :class:`~transformers.StaticCache`.

    ``start`` runs the (left-padded) prompt eagerly and allocates the cache for it and ``max_new_tokens`` more tokens;
    ``step`` runs one new token per row, compiled when ``compile`` is true. The states equal those of the
    dynamic-cache path (:func:`paretoalign.model.backbone_hidden`) up to floating-point reassociation.
    """

    def __init__(self, backbone: PreTrainedModel, max_new_tokens: int, compile: bool = True):
        if not is_int(max_new_tokens, 1):
            raise ValueError(f"a compiled decoder needs max_new_tokens (a positive integer) to size its cache, got {max_new_tokens!r}")
        self.backbone, self.max_new_tokens, self.compile = backbone, max_new_tokens, compile
        self.cache: StaticCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) over the whole cache: 1 on real tokens, 0 on padding and unused slots
        self.positions: torch.Tensor | None = None  # (B, 1) the next token's position id per row
        self.length = 0  # slots filled
        self._eager = _make_step(backbone)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The prompt's final hidden states ``(B, P, d)``; room is made for ``max_new_tokens`` more tokens."""
        batch, prompt = input_ids.shape
        capacity = -(-(prompt + self.max_new_tokens) // LENGTH_BUCKET) * LENGTH_BUCKET
        config = self.backbone.config
        if self.cache is not None and self.cache.max_cache_len == capacity and self.mask.shape[0] == batch:
            self.cache.reset()  # the same object: the compiled step's guards hold
        else:
            self.cache = StaticCache(config=config, max_cache_len=capacity)
        self.mask = attention_mask.new_zeros(batch, capacity)
        self.mask[:, :prompt] = attention_mask
        self.length = prompt
        self.positions = attention_mask.long().sum(dim=1, keepdim=True)  # (B, 1)
        positions = position_ids_from_mask(attention_mask)  # (B, P)
        cache_position = torch.arange(prompt, device=input_ids.device)
        return self._eager(self.cache, input_ids, self.mask, positions, cache_position)  # (B, P, d)

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One new token per row ``(B, 1)`` under the decoding mask ``(B, P + t)``: final hidden states ``(B, 1, d)``."""
        if self.cache is None:
            raise RuntimeError("StaticBackbone.step before start")
        if self.length >= self.mask.shape[1]:
            raise ValueError(f"the static cache holds {self.mask.shape[1]} tokens; start it with a larger max_new_tokens")
        self.mask[:, self.length] = attention_mask[:, -1]
        cache_position = torch.tensor([self.length], device=tokens.device)
        step = compiled_step(self.backbone) if self.compile else self._eager
        hidden = step(self.cache, tokens, self.mask, self.positions, cache_position)  # (B, 1, d)
        self.length += 1
        self.positions = self.positions + attention_mask[:, -1:].long()
        return hidden
