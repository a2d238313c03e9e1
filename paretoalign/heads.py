"""The trainable heads over the backbone: the reward head (with its optional reward branch) and the context gate."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import add_attention_pblora, bind_preference, decoder_stack, run_blocks
from .files import is_int
from .pblora import PBLoRAConfig, PBLoRALinear

REWARD_HEAD_KINDS = ("pblora", "hidden", "full_rank", "lora")
CONTEXT_WIDTHS = {"none": 1, "prompt": 2, "prompt-product": 3}  # what the adapter reads, in hidden sizes
REWARD_CONTEXTS = tuple(CONTEXT_WIDTHS)


def prompt_context(hidden: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """The mean of the final hidden states over each row's prompt tokens: ``(B, T, d)``, ``(B, T)`` -> ``(B, d)`` float32.

    What a reward head with ``reward_context="prompt"`` reads beside each position's own state: one summary of the
    request (is it harmful? what does it ask?) that the reply's last state alone carries only faintly.
    """
    weights = prompt_mask.to(torch.float32)[..., None]  # (B, T, 1)
    counts = weights.sum(dim=1)  # (B, 1)
    if bool((counts == 0).any()):
        raise ValueError("prompt_context needs at least one prompt token in every row (prompt_mask is empty for a row)")
    return (hidden.float() * weights).sum(dim=1) / counts  # (B, d)


def context_product(hidden: torch.Tensor, context: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``h ⊙ c`` rescaled to ``h``'s root-mean-square: ``(..., d)``, ``(..., d)`` -> ``(..., d)``.

    The product of two final states is dominated by the few outlier dimensions both share (its RMS is 4-6x the
    state's on SmolLM2); rescaling keeps the adapter's input on the scale of ``h`` at every position.
    """
    product = hidden * context
    scale = hidden.pow(2).mean(-1, keepdim=True).sqrt() / (product.pow(2).mean(-1, keepdim=True).sqrt() + eps)
    return product * scale


def constant_preference(preference: torch.Tensor) -> torch.Tensor:
    """What a preference-unaware adapter reads instead of ``preference``: ``(..., k) -> (..., 1)`` ones."""
    return preference.new_ones(*preference.shape[:-1], 1)  # the same input for every preference


class RewardHead(nn.Module):
    """z_RM over the frozen LM head: ``lm_head(h) + ΔW(w) h`` with a PBLoRA ΔW (never a copy of ``lm_head``).

    Kinds:
        ``pblora``: PBLoRA update over the frozen LM head: ``lm_head(h) + s·B·W(w)·A·h`` with ``B`` of shape ``V × r``.
        ``hidden``: PBLoRA update of the hidden state, read out by the frozen LM head: ``lm_head(h + s·B·W(w)·A·h)``
            with ``B`` of shape ``d × r``. Tokens with similar embeddings move together, so what the head
            learns on one token transfers to its neighbours (costs one more vocabulary projection per token).
        ``full_rank``: a trainable ``V × d`` head initialised from the LM head, plus a PBLoRA update
            (the Dual-Head paper's large-head setting; costs a second vocabulary projection per token).
        ``lora``: a preference-unaware low-rank update (ablation): the same layer fed a constant preference.

    ``context="prompt"`` (``hidden`` kind only): the adapter reads ``[h_t; c]``, each position's state beside the
    prompt's mean state ``c`` (:func:`prompt_context`), so what the head pushes can depend on the request as a whole
    (decline a harmful question, answer a benign one) and not only on the reply's latest state. The adapter is linear,
    so ``c`` adds the same logit shift at every position of a reply. ``context="prompt-product"`` adds
    :func:`context_product` ``(h_t ⊙ c)``: a bilinear term, so the request can change what the head wants *at a given
    point of the reply* (after "I'm sorry", a ", but" on a harmful request, a "for" on a benign one).
    """

    def __init__(self, lm_head: nn.Linear, kind: str, adapter: PBLoRAConfig, num_objectives: int, context: str = "none"):
        super().__init__()
        if kind not in REWARD_HEAD_KINDS:
            raise ValueError(f"reward head kind must be one of {REWARD_HEAD_KINDS}, got {kind!r}")
        if context not in REWARD_CONTEXTS:
            raise ValueError(f"reward_context must be one of {REWARD_CONTEXTS}, got {context!r}")
        if context != "none" and kind != "hidden":
            raise ValueError(f"reward_context {context!r} needs reward_head 'hidden', got {kind!r}")
        if lm_head.bias is not None and kind != "full_rank":
            raise ValueError("the backbone's LM head has a bias; only reward head kind 'full_rank' supports it")
        self.kind, self.context = kind, context
        self.preference_aware = kind != "lora"
        self.lm_head = None
        if kind == "hidden":
            # theta_0 = 0 over the hidden state: the head starts as the LM head and only the adapter trains.
            width = lm_head.in_features * CONTEXT_WIDTHS[context]  # [h_t], [h_t; c] or [h_t; c; h_t ⊙ c]
            base = nn.Linear(width, lm_head.in_features, bias=False)
            base.to(device=lm_head.weight.device, dtype=torch.float32)
            nn.init.zeros_(base.weight)
            freeze_base = True
            self.lm_head = [lm_head]  # shared with the backbone; a list keeps it out of this module's parameters
        elif kind == "full_rank":
            base = nn.Linear(lm_head.in_features, lm_head.out_features, bias=lm_head.bias is not None)
            base.to(device=lm_head.weight.device, dtype=lm_head.weight.dtype)
            base.load_state_dict(lm_head.state_dict())
            base.requires_grad_(True)
            freeze_base = False
        else:
            # Shared with the backbone, not copied; save_pretrained keeps trainable parameters only.
            base, freeze_base = lm_head, True
        adapter_objectives = num_objectives if self.preference_aware else 1
        self.adapter = PBLoRALinear(base, adapter.r1, adapter.r2, adapter_objectives, adapter.lora_alpha, freeze_base)

    def _adapter_preference(self, preference: torch.Tensor) -> torch.Tensor:
        if self.preference_aware:
            return preference
        return constant_preference(preference)  # (B, 1)

    def _adapter_input(self, hidden: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """What the adapter reads: ``hidden`` ``(..., d)``, ``[hidden; context]`` ``(..., 2d)`` with a prompt context, or
        ``[hidden; context; context_product]`` ``(..., 3d)`` (``context`` ``(B, d)`` per row, broadcast over the positions
        of ``hidden`` ``(B, d)`` or ``(B, T, d)``)."""
        if self.context == "none":
            return hidden
        if context is None:
            raise ValueError(f"this reward head reads the prompt's mean state (reward_context {self.context!r}): pass context")
        if context.shape[0] != hidden.shape[0] or context.shape[-1] != hidden.shape[-1]:
            raise ValueError(f"context must be (B, d) = ({hidden.shape[0]}, {hidden.shape[-1]}), got {tuple(context.shape)}")
        context = context.to(hidden.dtype).reshape(context.shape[0], *([1] * (hidden.dim() - 2)), context.shape[-1])
        context = context.expand_as(hidden)
        if self.context == "prompt":
            return torch.cat([hidden, context], dim=-1)  # (..., 2d)
        return torch.cat([hidden, context, context_product(hidden, context)], dim=-1)  # (..., 3d)

    def forward(
        self, hidden: torch.Tensor, lm_logits: torch.Tensor, preference: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Reward logits ``(B, T, V)`` from hidden states ``(B, T, d)`` and the LM head's ``(B, T, V)``; ``context``
        ``(B, d)``: the prompt's mean state, for a head with ``context="prompt"``."""
        preference = self._adapter_preference(preference)
        if self.kind == "full_rank":
            return self.adapter(hidden, preference)  # (B, T, V)
        if self.kind == "hidden":
            lm_head = self.lm_head[0]
            shift = self.adapter.adapter_output(self._adapter_input(hidden, context), preference)  # (B, T, d)
            return lm_logits + lm_head(shift.to(lm_head.weight.dtype)).to(lm_logits.dtype)  # (B, T, V)
        return lm_logits + self.adapter.adapter_output(hidden, preference).to(lm_logits.dtype)  # (B, T, V)

    def candidate_shift(
        self,
        hidden: torch.Tensor,
        preference: torch.Tensor,
        candidates: torch.Tensor,
        base_hidden: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``z_RM - z_LM`` at a few candidate tokens per position: ``(N, d)``, ``(N, k)``, ``(N, C)`` ids -> ``(N, C)``.

        Equals ``(forward(hidden, lm_logits, preference) - lm_logits).gather(-1, candidates)`` without a ``V``-wide
        product, which is what lets training score only each position's likeliest tokens (:mod:`paretoalign.candidates`).
        ``base_hidden`` ``(N, d)``: the backbone's final state when ``hidden`` is a reward branch's own (``reward_layers``
        > 0); ``z_LM`` is read from it, so the LM head's change ``W·(hidden - base_hidden)`` is added.
        ``context`` ``(N, d)``: each row's prompt mean state, for a head with ``context="prompt"``.
        ``full_rank`` changes every logit through a trainable ``V × d`` matrix and has no such shortcut.
        """
        if self.kind == "full_rank":
            raise ValueError("reward head kind 'full_rank' changes every logit; train it on the whole vocabulary (candidate_tokens = null)")
        preference = self._adapter_preference(preference)
        hidden = hidden.float()
        moved = None if base_hidden is None else hidden - base_hidden.float()  # (N, d) the branch's change of the state
        if self.kind == "hidden":
            shift = self.adapter.adapter_output(self._adapter_input(hidden, context), preference)  # (N, d)
            moved = shift if moved is None else moved + shift
            return self._embedding_rows(candidates, moved)  # (N, C)
        shift = self.adapter.adapter_output_rows(hidden, preference, candidates)  # (N, C)
        return shift if moved is None else shift + self._embedding_rows(candidates, moved)

    def _embedding_rows(self, candidates: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """The frozen LM head's logits of ``state`` ``(N, d)`` at ``candidates`` ``(N, C)`` only: ``(N, C)``."""
        weight = self.lm_head[0].weight if self.lm_head is not None else self.adapter.base_layer.weight
        return torch.einsum("nd,ncd->nc", state, weight[candidates].float())


class RewardBranch(nn.Module):
    """The reward head's own copy of the backbone's last ``k`` blocks, with PBLoRA on their attention projections.

    ``h_RM = norm(blocks_{N-k..N-1}(H^{(N-k)}; w))``: the branch starts from the residual stream entering block
    ``N - k`` (shared with the LM branch, which keeps the frozen blocks) and returns the state the reward head
    reads instead of the backbone's final one. The adapters' ``lora_B`` start at zero, so an untrained branch
    returns exactly the backbone's final hidden state. Extra decode cost: ``k`` of ``N`` blocks per token, with
    the branch's own key/value cache.

    The copied blocks stay frozen and are never saved (they are the backbone's weights); only the adapters train.
    """

    def __init__(self, backbone: nn.Module, layers: int, adapter: PBLoRAConfig, num_objectives: int, preference_aware: bool = True):
        super().__init__()
        stack = decoder_stack(backbone)
        total = len(stack.layers)
        if not is_int(layers, 1) or layers > total:
            raise ValueError(f"reward_layers must be an integer in [1, {total}] for a {total}-block backbone, got {layers!r}")
        self.first_layer = total - layers
        self.preference_aware = preference_aware
        self.blocks = nn.ModuleList(copy.deepcopy(block) for block in stack.layers[self.first_layer :]).requires_grad_(False)
        for index, block in enumerate(self.blocks):
            block.self_attn.layer_idx = index  # slots in the branch's own key/value cache
        adapter_objectives = num_objectives if preference_aware else 1
        add_attention_pblora(self.blocks, adapter.r1, adapter.r2, adapter_objectives, adapter.lora_alpha, self.first_layer)
        self._stack = [stack]  # the backbone's (config, rotary embedding, final norm); a list keeps it out of this module
        self.pass_fraction = layers / total  # of a backbone pass, per call (the sweep's cost accounting)

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        preference: torch.Tensor,
        past_key_values=None,
        from_layer: int | None = None,
    ) -> torch.Tensor:
        """The reward head's hidden states ``(B, T, d)``.

        Args:
            hidden: ``(B, T, d)`` the residual stream entering block ``from_layer`` (default ``N - k``).
            attention_mask: ``(B, P + T)`` over cached and new positions.
            preference: ``(B, k)`` one preference per row.
            past_key_values: the branch's own transformers cache (extended in place), or ``None``.
            from_layer: a lower block (``<= N - k``) whose input ``hidden`` is; the frozen backbone blocks up to
                ``N - k`` run first (a training cache of one lower layer serves every ``k`` up to ``N - layer``).
        """
        stack = self._stack[0]
        from_layer = self.first_layer if from_layer is None else from_layer
        if not 0 <= from_layer <= self.first_layer:
            raise ValueError(f"from_layer must be in [0, {self.first_layer}] for a {len(self.blocks)}-block reward branch, got {from_layer!r}")
        if from_layer < self.first_layer:
            if past_key_values is not None:
                raise ValueError("from_layer below the branch's first block is for training from a cache, not for decoding")
            with torch.no_grad():
                hidden = run_blocks(stack, stack.layers[from_layer : self.first_layer], hidden, attention_mask)  # (B, T, d)
        bind_preference(self.blocks, preference if self.preference_aware else constant_preference(preference))
        return stack.norm(run_blocks(stack, self.blocks, hidden, attention_mask, past_key_values))  # (B, T, d)


@dataclass
class GateCache:
    """The context gate's own key/value cache for incremental decoding."""

    keys: torch.Tensor  # (B, heads, T, head_dim)
    values: torch.Tensor  # (B, heads, T, head_dim)

    @property
    def length(self) -> int:
        return self.keys.shape[2]


class ContextGate(nn.Module):
    """alpha_t = sigmoid(W_g · MHA(h_t, H_1:t, H_1:t) + b_g), with preference-conditioned projections.

    The attention is causal: alpha_t never depends on a later token. Padding keys are ignored. With a
    :class:`GateCache` the gate attends over the whole history while computing only the new positions.
    """

    def __init__(
        self,
        hidden_size: int,
        gate_size: int,
        num_heads: int,
        adapter: PBLoRAConfig,
        num_objectives: int,
        fixed_alpha: float | None = None,
        preference_aware: bool = True,
    ):
        super().__init__()
        if gate_size % num_heads:
            raise ValueError(f"gate_size ({gate_size}) must be divisible by gate_heads ({num_heads})")
        self.num_heads, self.head_dim, self.fixed_alpha = num_heads, gate_size // num_heads, fixed_alpha
        self.preference_aware = preference_aware  # False: the published, preference-blind gate (plain low-rank attention)
        adapter_objectives = num_objectives if preference_aware else 1

        def projection(in_features: int) -> PBLoRALinear:
            base = nn.Linear(in_features, gate_size)
            return PBLoRALinear(base, adapter.r1, adapter.r2, adapter_objectives, adapter.lora_alpha, freeze_base=False)

        self.q_proj, self.k_proj, self.v_proj = (projection(hidden_size) for _ in range(3))
        self.o_proj = projection(gate_size)
        self.score = nn.Linear(gate_size, 1)  # W_g, b_g
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)  # alpha starts near 0.5

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, T, G) -> (B, heads, T, head_dim)

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        preference: torch.Tensor,
        cache: GateCache | None = None,
        last_only: bool = False,
        logits: bool = False,
    ) -> tuple[torch.Tensor, GateCache | None]:
        """Gate values for the new positions.

        Args:
            hidden: ``(B, T, d)`` hidden states of the new positions.
            attention_mask: ``(B, P + T)`` 1 for real tokens, 0 for padding, over cached and new positions.
            preference: ``(B, k)`` one preference per row.
            cache: keys/values of the ``P`` earlier positions, or ``None`` when ``P = 0``.
            last_only: compute alpha for the last new position only (keys/values still cover all of them).
            logits: return the pre-sigmoid ``W_g · MHA(...) + b_g`` instead of alpha (what a penalty on saturation
                needs: at a saturated gate alpha is exactly 0 or 1 in float32 and says nothing about how far).

        Returns:
            ``alpha`` (or its logits) of shape ``(B, T)`` (``(B, 1)`` with ``last_only``) and the extended cache.
        """
        batch, new = hidden.shape[:2]
        if not self.preference_aware:
            preference = constant_preference(preference)  # (B, 1)
        if self.fixed_alpha is not None:
            fixed = torch.logit(torch.tensor(self.fixed_alpha)).item() if logits else self.fixed_alpha
            return hidden.new_full((batch, 1 if last_only else new), fixed), None
        past = cache.length if cache is not None else 0
        if attention_mask.shape != (batch, past + new):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, past + new)}")
        keys = self._split_heads(self.k_proj(hidden, preference))  # (B, heads, T, hd)
        values = self._split_heads(self.v_proj(hidden, preference))  # (B, heads, T, hd)
        if cache is not None:
            keys = torch.cat([cache.keys, keys], dim=2)  # (B, heads, P + T, hd)
            values = torch.cat([cache.values, values], dim=2)  # (B, heads, P + T, hd)
        queries_in = hidden[:, -1:] if last_only else hidden  # (B, Tq, d)
        queries = self._split_heads(self.q_proj(queries_in, preference))  # (B, heads, Tq, hd)
        query_positions = torch.arange(past + new - queries.shape[2], past + new, device=hidden.device)  # (Tq,)
        key_positions = torch.arange(past + new, device=hidden.device)  # (P + T,)
        causal = key_positions[None, :] <= query_positions[:, None]  # (Tq, P + T)
        allowed = causal[None] & attention_mask[:, None, :].bool()  # (B, Tq, P + T)
        # A padding query sees no real key; let it see itself so its (ignored) output stays finite.
        allowed = allowed | (key_positions[None, :] == query_positions[:, None])[None]
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed[:, None])  # (B, heads, Tq, hd)
        attended = attended.transpose(1, 2).flatten(2)  # (B, Tq, G)
        scores = self.score(self.o_proj(attended, preference)).squeeze(-1)  # (B, Tq) pre-sigmoid
        return (scores if logits else torch.sigmoid(scores)), GateCache(keys, values)
