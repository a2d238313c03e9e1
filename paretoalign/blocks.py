"""Running and adapting the top blocks of a Llama-style decoder on their own.

Three users share this: the Dual-Head's reward branch (``DualHeadConfig.reward_layers``), which re-runs the
backbone's last ``k`` blocks with PBLoRA adapters from the state at block ``N - k``; the PARM and GenARM baselines,
whose ARMs adapt the top blocks of a backbone copy; and every trainer, which caches the input of the first adapted
block once and then runs only the blocks above it (:func:`run_blocks`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .backbone import cache_kwargs
from .pblora import PBLoRALinear

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: ``(B, T)`` mask -> ``(B, T)`` positions (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside ``model`` (a peft model's base model, or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_stack(model: nn.Module) -> nn.Module:
    """The block stack of a Llama-style causal LM (``layers``, ``norm``, ``rotary_emb``), e.g. ``LlamaModel``."""
    stack = causal_lm(model).base_model
    missing = [name for name in ("layers", "norm", "rotary_emb") if not hasattr(stack, name)]
    if missing:
        raise TypeError(
            f"{type(stack).__name__} has no {missing}: running blocks on their own needs a Llama-style decoder "
            "(layers, norm, rotary_emb)"
        )
    return stack


def run_blocks(
    stack: nn.Module,
    blocks: Sequence[nn.Module],
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    past_key_values=None,
) -> torch.Tensor:
    """Run ``blocks`` (in order) from their input ``hidden``; no final norm.

    Args:
        stack: the decoder stack the blocks come from (its config and rotary embedding are used).
        hidden: ``(B, T, d)`` input of the first block, for the ``T`` new positions.
        attention_mask: ``(B, P + T)`` 1 for tokens, 0 for left padding, over cached and new positions.
        past_key_values: a transformers cache holding the blocks' keys/values of the ``P`` earlier positions
            (extended in place), or ``None`` when ``P = 0``.

    Returns:
        ``(B, T, d)`` the output of the last block; equal to the backbone's own residual stream there (tested).
    """
    from transformers.masking_utils import create_causal_mask

    hidden = hidden.to(stack.norm.weight.dtype)
    positions = position_ids_from_mask(attention_mask)[:, -hidden.shape[1] :]  # (B, T)
    mask = create_causal_mask(
        config=stack.config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        position_ids=positions,
        **cache_kwargs(create_causal_mask, past_key_values),
    )
    rotary = stack.rotary_emb(hidden, position_ids=positions)  # (cos, sin), each (B, T, head_dim)
    for block in blocks:
        hidden = block(
            hidden,
            attention_mask=mask,
            position_embeddings=rotary,
            position_ids=positions,
            use_cache=past_key_values is not None,
            **cache_kwargs(type(block).forward, past_key_values),
        )
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # (B, T, d); older transformers return a tuple
    return hidden


class BoundPBLoRALinear(PBLoRALinear):
    """A :class:`~paretoalign.pblora.PBLoRALinear` whose preference is bound before the forward pass.

    Attention modules call their projections as ``proj(x)``; :func:`bind_preference` sets the ``(k,)`` or ``(B, k)``
    preference that every such call then uses, for the whole prompt and each decoding step after it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bound_preference: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, preference: torch.Tensor | None = None) -> torch.Tensor:
        if preference is not None:
            return super().forward(x, preference)
        if self.bound_preference is None:
            raise RuntimeError("no preference is bound to this PBLoRA layer; call bind_preference(model, preference) first")
        # bind_preference validated it once; a decoding step does not check it again in every projection
        return self.forward_checked(x, self.bound_preference)


def add_attention_pblora(
    blocks: Sequence[nn.Module], r1: int, r2: int, num_objectives: int, lora_alpha: float, first_index: int = 0
) -> None:
    """Wrap (in place) the q/k/v/o projections of every block in :class:`BoundPBLoRALinear`.

    Their ``lora_B`` start at zero, so the blocks still compute what they did. ``first_index`` only names blocks
    in errors.
    """
    for offset, block in enumerate(blocks):
        attention = getattr(block, "self_attn", None)
        missing = [name for name in ATTENTION_PROJECTIONS if not isinstance(getattr(attention, name, None), nn.Linear)]
        if missing:
            raise TypeError(
                f"block {first_index + offset} has no nn.Linear attention projections {missing} under self_attn to adapt"
            )
        for name in ATTENTION_PROJECTIONS:
            setattr(attention, name, BoundPBLoRALinear(getattr(attention, name), r1, r2, num_objectives, lora_alpha))


def bind_preference(model: nn.Module, preference: torch.Tensor) -> None:
    """Condition every :class:`BoundPBLoRALinear` of ``model`` on ``preference``, ``(k,)`` or ``(B, k)`` (one per row)."""
    layers = [module for module in model.modules() if isinstance(module, BoundPBLoRALinear)]
    if not layers:
        raise ValueError("model has no PBLoRA layers to bind a preference to")
    preference = layers[0]._check_preference(preference)  # validated once: a point of the simplex per row
    for layer in layers:
        layer.bound_preference = preference
