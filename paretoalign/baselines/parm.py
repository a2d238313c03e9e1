"""PARM decoding: the frozen backbone guided by one preference-conditioned autoregressive reward model (PBLoRA).

    log pi(y_t | x, y_<t, w) ∝ log pi_base(y_t | ...) + (1 / beta) · log pi_theta(y_t | ..., w)

The ARM is a full copy of the backbone whose top blocks carry PBLoRA adapters conditioned on each row's preference;
it keeps its own KV cache, so a token costs two model passes.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..generation import BaseDecoder, StepOutput
from .arm import adapter_size, bind_preference, default_checkpoint, guided_logits, load_arm

DEFAULT_STRENGTH = 1.0  # 1 / beta


class PARMDecoder:
    """PARM over ``backbone`` with one preference-conditioned ``arm`` (see :func:`~paretoalign.baselines.arm.add_pblora`).

    Args:
        columns: for each of the ARM's objectives, its column in the preferences this decoder is handed
            (the ARM may list the objectives in another order than the model does).
    """

    def __init__(self, backbone: nn.Module, arm: nn.Module, strength: float = DEFAULT_STRENGTH, columns: list[int] | None = None):
        if not strength >= 0:
            raise ValueError(f"strength (1 / beta) must be >= 0, got {strength!r}")
        self.backbone, self.arm = backbone, arm
        self.strength = float(strength)
        self.columns = columns
        self.model_passes_per_token = 2
        self._base = BaseDecoder(backbone)
        self._arm = BaseDecoder(arm)
        self.weights: torch.Tensor | None = None

    def trainable_parameters(self) -> int:
        """The ARM's PBLoRA weights (the backbone copy under them is frozen)."""
        return adapter_size(self.arm)

    def start(self, input_ids, attention_mask, preference, prompts=None) -> StepOutput:
        arm_preference = preference if self.columns is None else preference[:, self.columns]  # (B, k) in the ARM's order
        bind_preference(self.arm, arm_preference)
        self.weights = preference.new_full((preference.shape[0], 1), self.strength)  # (B, 1): 1 / beta
        base = self._base.start(input_ids, attention_mask, preference)
        arm = self._arm.start(input_ids, attention_mask, preference)
        return StepOutput(guided_logits(base.logits, [arm.logits], self.weights))  # (B, V)

    def step(self, tokens, attention_mask) -> StepOutput:
        base, arm = self._base.step(tokens, attention_mask), self._arm.step(tokens, attention_mask)
        return StepOutput(guided_logits(base.logits, [arm.logits], self.weights))  # (B, V)


def build_decoder(
    model, strength: float | None = None, fusion: str | None = None, checkpoint: str | os.PathLike | None = None, **options
) -> PARMDecoder:
    """The ``parm`` method: load the PARM ARM (default ``checkpoints/parm``) onto a copy of ``model``'s backbone.
    ``strength`` is ``1 / beta``; ``fusion`` is unused."""
    directory = default_checkpoint("parm") if checkpoint is None else checkpoint
    arm, config = load_arm(directory, model.backbone, model.tokenizer, "parm")
    if sorted(config.objectives) != sorted(model.objectives):
        raise ValueError(
            f"the PARM checkpoint {str(directory)!r} scores objectives {config.objectives}, the model {list(model.objectives)}"
        )
    columns = [list(model.objectives).index(name) for name in config.objectives]
    return PARMDecoder(model.backbone, arm, DEFAULT_STRENGTH if strength is None else strength, columns)
