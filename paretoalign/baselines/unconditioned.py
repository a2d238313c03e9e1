"""The Dual-Head as published: a reward head and a context gate that never see the preference (a single Pareto point).

The reward head is the existing preference-unaware ablation (kind ``lora``: its low-rank update is fed a constant
input); the gate is built the same way, its PBLoRA projections fed one constant ``(B, 1)`` input instead of the
preference, so it is plain low-rank attention. Trained with the Dual-Head objective on every objective's pairs
(``paretoalign train-arm --method dualhead-unconditioned``), it is decoded with the ordinary
:class:`~paretoalign.generation.DualHeadDecoder`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..files import atomic_write
from ..generation import DualHeadDecoder
from ..heads import ContextGate
from ..model import CONFIG_NAME, DualHeadModel
from .arm import default_checkpoint, missing_checkpoint

METHOD = "dualhead-unconditioned"
MARKER_NAME = "unconditioned.json"


class UnconditionedDualHeadModel(DualHeadModel):
    """A :class:`~paretoalign.model.DualHeadModel` whose heads ignore the preference (``reward_head`` must be ``lora``).

    Its checkpoint is an ordinary Dual-Head checkpoint plus ``unconditioned.json``, which says the gate takes no preference.
    """

    def __init__(self, backbone, tokenizer, config=None):
        if config is None or config.reward_head != "lora":
            found = None if config is None else config.reward_head
            raise ValueError(
                f"the unconditioned Dual-Head needs a config with reward_head='lora' (preference-unaware), got {found!r}"
            )
        super().__init__(backbone, tokenizer, config)
        self.context_gate = ContextGate(
            config.hidden_size,
            config.gate_size,
            config.gate_heads,
            config.gate_adapter,
            config.num_objectives,
            config.fixed_gate,
            preference_aware=False,
        ).to(self.device)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        super().save_pretrained(directory)
        text = (
            json.dumps(
                {"method": METHOD, "reward_head": "lora", "gate": "preference replaced by a constant"}, indent=2, sort_keys=True
            )
            + "\n"
        )
        atomic_write(Path(directory) / MARKER_NAME, lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, backbone=None, tokenizer=None, **kwargs) -> UnconditionedDualHeadModel:
        """Load a checkpoint written by :meth:`save_pretrained`; a missing one names the command that creates it."""
        directory = Path(directory).expanduser()
        if not (directory / CONFIG_NAME).is_file():
            raise missing_checkpoint(METHOD, directory, CONFIG_NAME)
        if not (directory / MARKER_NAME).is_file():
            raise ValueError(
                f"{directory} is a Dual-Head checkpoint with a preference-conditioned gate (no {MARKER_NAME}), not {METHOD}"
            )
        return super().from_pretrained(directory, backbone, tokenizer, **kwargs)


def unconditioned_model(backbone, tokenizer, config) -> UnconditionedDualHeadModel:
    """Fresh unconditioned heads for ``backbone`` from a :class:`~paretoalign.model.DualHeadConfig` (reward head: ``lora``,
    which reads each position's state only: no prompt context)."""
    config.reward_head, config.reward_context = "lora", "none"
    return UnconditionedDualHeadModel(backbone, tokenizer, config)


def build_decoder(
    model, strength: float | None = None, fusion: str | None = None, checkpoint=None, guidance_top_k: int | None = None, **options
) -> DualHeadDecoder:
    """The ``dualhead-unconditioned`` method: its heads (default ``checkpoints/dualhead-unconditioned``) on ``model``'s
    backbone, decoded like the Dual-Head (``fusion``, ``strength`` and ``guidance_top_k`` as there; default: its
    checkpoint's)."""
    directory = default_checkpoint(METHOD) if checkpoint is None else checkpoint
    heads = UnconditionedDualHeadModel.from_pretrained(directory, backbone=model.backbone, tokenizer=model.tokenizer)
    return DualHeadDecoder(heads, fusion, strength, guidance_top_k)


def train_unconditioned(config, out: str | os.PathLike, progress: bool = True) -> UnconditionedDualHeadModel:
    """Train the unconditioned heads with the Dual-Head trainer and save them to ``out``.

    ``config`` is a :class:`~paretoalign.train.TrainConfig` whose ``model`` sets ``reward_head='lora'``; the run
    (checkpoints, log, resumable) lives in ``config.output_dir``. Each step still draws ``w ~ Dirichlet`` and
    weighs the objectives' preference losses by it, but the heads never see ``w``: they learn one trade-off, in
    expectation the uniform mixture of the objectives' data, as the published Dual-Head does from mixed data.
    """
    from ..backbone import load_backbone
    from ..train import train

    if config.model.get("reward_head") != "lora":
        raise ValueError(f"config.model must set reward_head='lora' for {METHOD}, got {config.model.get('reward_head')!r}")
    backbone, tokenizer = load_backbone(config.backbone)
    torch.manual_seed(config.seed)
    model = unconditioned_model(backbone, tokenizer, config.model_config())
    train(config, model, progress)
    model.save_pretrained(out)
    return model
