"""GenARM decoding: the frozen backbone guided by one autoregressive reward model per objective, each a separate model.

    log pi(y_t | x, y_<t) ∝ log pi_base(y_t | ...) + sum_i (w_i / beta) · log pi_r_i(y_t | ...)

Every ARM is a full LoRA copy of the backbone with its own KV cache, so a token costs ``1 + k`` model passes for ``k``
objectives; nothing is shared with the base pass.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..generation import BaseDecoder, StepOutput
from .arm import adapter_size, causal_lm, default_checkpoint, guided_logits, load_arm

DEFAULT_STRENGTH = 1.0  # 1 / beta


class GenARMDecoder:
    """GenARM over ``backbone`` with one ARM per objective, in the preference's column order.

    Example:
        >>> decoder = GenARMDecoder(model.backbone, [helpful_arm, harmless_arm], strength=1.0)
        >>> generate(model, "Hi", [0.3, 0.7], decoder=decoder)
    """

    def __init__(self, backbone: nn.Module, arms: Sequence[nn.Module], strength: float = DEFAULT_STRENGTH):
        if not arms:
            raise ValueError("GenARM needs at least one ARM")
        if not strength >= 0:
            raise ValueError(f"strength (1 / beta) must be >= 0, got {strength!r}")
        self.backbone = backbone
        self.arms = nn.ModuleList(arms)  # held as modules so the sweep's pass counter sees every ARM
        self.strength = float(strength)
        self.model_passes_per_token = 1 + len(arms)
        self._base = BaseDecoder(backbone)
        self._arm_decoders = [BaseDecoder(causal_lm(arm)) for arm in arms]  # one KV cache per ARM
        self.weights: torch.Tensor | None = None

    def trainable_parameters(self) -> int:
        """The ARMs' LoRA weights (the backbone copies under them are frozen)."""
        return sum(adapter_size(arm) for arm in self.arms)

    def _scores(self, base: StepOutput, arms: list[StepOutput]) -> StepOutput:
        return StepOutput(guided_logits(base.logits, [out.logits for out in arms], self.weights))  # (B, V)

    def start(self, input_ids, attention_mask, preference) -> StepOutput:
        if preference.shape[-1] != len(self.arms):
            raise ValueError(f"preference has {preference.shape[-1]} weights but GenARM holds {len(self.arms)} ARMs")
        self.weights = self.strength * preference.float()  # (B, k): w_i / beta
        base = self._base.start(input_ids, attention_mask, preference)
        return self._scores(base, [decoder.start(input_ids, attention_mask, preference) for decoder in self._arm_decoders])

    def step(self, tokens, attention_mask) -> StepOutput:
        base = self._base.step(tokens, attention_mask)
        return self._scores(base, [decoder.step(tokens, attention_mask) for decoder in self._arm_decoders])


def checkpoint_paths(objectives: Sequence[str], checkpoint: str | os.PathLike | Mapping | None = None) -> dict[str, Path]:
    """Each objective's ARM directory.

    Args:
        checkpoint: ``None`` for the defaults (``checkpoints/genarm-<objective>``), a path template holding
            ``{objective}``, or a mapping ``{objective: directory}`` covering every objective.
    """
    if checkpoint is None:
        return {name: default_checkpoint("genarm", name) for name in objectives}
    if isinstance(checkpoint, Mapping):
        missing = [name for name in objectives if name not in checkpoint]
        if missing:
            raise ValueError(f"checkpoint must name a directory for every objective {list(objectives)}, missing {missing}")
        return {name: Path(checkpoint[name]).expanduser() for name in objectives}
    if isinstance(checkpoint, (str, os.PathLike)) and "{objective}" in str(checkpoint):
        return {name: Path(str(checkpoint).replace("{objective}", name)).expanduser() for name in objectives}
    raise ValueError(
        f"checkpoint must be None, a path template holding '{{objective}}', or {{objective: directory}}, got {checkpoint!r}"
    )


def build_decoder(model, strength: float | None = None, fusion: str | None = None, checkpoint=None, **options) -> GenARMDecoder:
    """The ``genarm`` method: load one ARM per objective of ``model`` (a :class:`~paretoalign.model.DualHeadModel`,
    whose backbone is the base) onto its own copy of the backbone. ``strength`` is ``1 / beta``; ``fusion`` is unused."""
    paths = checkpoint_paths(model.objectives, checkpoint)
    arms = [load_arm(path, model.backbone, model.tokenizer, "genarm", objective)[0] for objective, path in paths.items()]
    return GenARMDecoder(model.backbone, arms, DEFAULT_STRENGTH if strength is None else strength)
