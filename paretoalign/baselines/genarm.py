"""GenARM decoding: the frozen backbone guided by one autoregressive reward model per objective, each a separate model.

    log pi(y_t | x, y_<t) ∝ log pi_base(y_t | ...) + sum_i (w_i / beta) · log pi_r_i(y_t | ...)

Every ARM is a full LoRA copy of the backbone with its own KV cache, so a token costs ``1 + k`` model passes for ``k``
objectives; nothing is shared with the base pass.

GenARM on the Dual-Head's terms (:class:`GenARMHeadsDecoder`): the same fusion over reward *heads* on the shared
backbone, one per objective (each trained alone, ``TrainConfig.train_objective``, on the same data and steps as the
Dual-Head), so one backbone pass per token serves every objective. A checkpoint folder holding a Dual-Head checkpoint
instead of an ARM selects it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from ..files import read_json_object
from ..generation import BaseDecoder, StepOutput
from ..model import CONFIG_NAME as HEADS_CONFIG_NAME
from ..model import DualHeadModel, backbone_hidden, check_guidance_top_k, restrict_to_base_top_k
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

    def start(self, input_ids, attention_mask, preference, prompts=None) -> StepOutput:
        if preference.shape[-1] != len(self.arms):
            raise ValueError(f"preference has {preference.shape[-1]} weights but GenARM holds {len(self.arms)} ARMs")
        self.weights = self.strength * preference.float()  # (B, k): w_i / beta
        base = self._base.start(input_ids, attention_mask, preference)
        return self._scores(base, [decoder.start(input_ids, attention_mask, preference) for decoder in self._arm_decoders])

    def step(self, tokens, attention_mask) -> StepOutput:
        base = self._base.step(tokens, attention_mask)
        return self._scores(base, [decoder.step(tokens, attention_mask) for decoder in self._arm_decoders])


class GenARMHeadsDecoder:
    """GenARM's fusion over one reward head per objective on the shared backbone (one backbone pass per token).

    Head ``i`` (a :class:`~paretoalign.model.DualHeadModel` trained for objective ``i`` alone) is read at that
    objective's one-hot preference; the next-token scores are ``log_softmax(z_LM) + strength · sum_i w_i ·
    log_softmax(z_RM_i)`` restricted to the frozen LM's ``guidance_top_k`` likeliest tokens, as the Dual-Head's.
    Within a top-k the heads are read out at the kept tokens only, so the scores are those less a per-row constant
    (the same choices and sampling distribution, without a vocabulary-wide product per head).

    Example:
        >>> heads = [DualHeadModel.from_pretrained(d, backbone=model.backbone, tokenizer=model.tokenizer) for d in dirs]
        >>> generate(model, "Hi", [0.3, 0.7], decoder=GenARMHeadsDecoder(heads, strength=3.0))
    """

    def __init__(self, heads: Sequence[DualHeadModel], strength: float = DEFAULT_STRENGTH, guidance_top_k: int | None = None):
        if not heads:
            raise ValueError("GenARM needs at least one reward head")
        if not strength >= 0:
            raise ValueError(f"strength (1 / beta) must be >= 0, got {strength!r}")
        backbone = heads[0].backbone
        for head in heads:
            if head.backbone is not backbone:
                raise ValueError("GenARM's reward heads must share one backbone (load each with backbone=model.backbone)")
            if head.reward_branch is not None:
                raise ValueError("GenARM's reward heads read the final state: a head with reward_layers > 0 is not supported")
        self.heads = nn.ModuleList(heads)
        self.backbone = backbone
        self.strength = float(strength)
        top_k = heads[0].config.guidance_top_k if guidance_top_k is None else guidance_top_k
        self.guidance_top_k = check_guidance_top_k(top_k)
        vocab = backbone.get_output_embeddings().out_features
        # within a top-k, each head is read out at the kept tokens only (not for a full-rank head: no such shortcut)
        self.read_out_top_k = 0 < self.guidance_top_k < vocab and all(head.reward_head.kind != "full_rank" for head in heads)
        self.model_passes_per_token = 1
        self.cache: DynamicCache | None = None
        self.weights: torch.Tensor | None = None
        self.contexts: list[torch.Tensor | None] = []
        self.one_hots: list[torch.Tensor] = []

    def trainable_parameters(self) -> int:
        """The heads' weights (the shared backbone is frozen)."""
        return sum(p.numel() for head in self.heads for p in head.parameters() if p.requires_grad)

    def _scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt: bool = False) -> StepOutput:
        hidden = backbone_hidden(self.backbone, input_ids, attention_mask, self.cache)  # (B, T, d)
        if prompt:
            self.contexts = [head.prompt_context(hidden, attention_mask) for head in self.heads]  # (B, d) or None each
        last = hidden[:, -1:]  # (B, 1, d)
        lm_logits = self.heads[0].lm_logits(last)  # (B, 1, V)
        base = lm_logits[:, -1]  # (B, V)
        if self.read_out_top_k:
            # z_RM_i at the kept tokens only (z_LM + the head's shift there): log_softmax(z_RM_i) is z_RM_i less a
            # per-row constant, which neither the greedy choice nor sampling within the kept tokens sees.
            keep = base.topk(self.guidance_top_k, dim=-1).indices  # (B, k)
            kept_base = base.gather(-1, keep)  # (B, k)
            kept = torch.log_softmax(base, dim=-1).gather(-1, keep)  # (B, k)
            for index, (head, one_hot, context) in enumerate(zip(self.heads, self.one_hots, self.contexts)):
                reward = kept_base + head.reward_shift(last[:, -1], one_hot, keep, context=context)  # (B, k)
                kept = kept + self.weights[:, index, None] * reward
            return StepOutput(torch.full_like(base, float("-inf")).scatter(-1, keep, kept), None, base)
        rewards = [
            head.reward_logits(last, one_hot, lm_logits, context)[:, -1]  # (B, V)
            for head, one_hot, context in zip(self.heads, self.one_hots, self.contexts)
        ]
        logits = guided_logits(base, rewards, self.weights)  # (B, V)
        return StepOutput(restrict_to_base_top_k(logits, base, self.guidance_top_k), None, base)

    def start(self, input_ids, attention_mask, preference, prompts=None) -> StepOutput:
        if preference.shape[-1] != len(self.heads):
            raise ValueError(f"preference has {preference.shape[-1]} weights but GenARM holds {len(self.heads)} reward heads")
        self.weights = self.strength * preference.float()  # (B, k): w_i / beta
        rows, k = preference.shape[0], len(self.heads)
        # head i is read at the one-hot it was trained at, (B, k) each, built once per answer rather than per token
        self.one_hots = list(torch.eye(k, device=preference.device)[:, None, :].expand(k, rows, k))
        self.cache = DynamicCache(config=self.backbone.config)
        return self._scores(input_ids, attention_mask, prompt=True)

    def step(self, tokens, attention_mask) -> StepOutput:
        return self._scores(tokens, attention_mask)


def load_heads(paths: Mapping[str, Path], model: DualHeadModel) -> list[DualHeadModel]:
    """One reward head per objective from Dual-Head checkpoints, on ``model``'s backbone. A head whose run config
    (``train_config.json`` beside it or one folder up) names another ``train_objective`` is refused."""
    heads = []
    for objective, path in paths.items():
        head = DualHeadModel.from_pretrained(path, backbone=model.backbone, tokenizer=model.tokenizer)
        if head.objectives != list(model.objectives):
            raise ValueError(f"{path} has objectives {head.objectives}, the model {list(model.objectives)}")
        for folder in (path, path.parent):
            if (folder / "train_config.json").is_file():
                trained = read_json_object(folder / "train_config.json", "train config").get("train_objective")
                if trained is not None and trained != objective:
                    raise ValueError(f"{path} is the reward head of {trained!r}, not of {objective!r}")
                break
        heads.append(head.eval())
    return heads


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


def build_decoder(
    model, strength: float | None = None, fusion: str | None = None, checkpoint=None, guidance_top_k: int | None = None, **options
) -> GenARMDecoder | GenARMHeadsDecoder:
    """The ``genarm`` method: load one ARM per objective of ``model`` (a :class:`~paretoalign.model.DualHeadModel`,
    whose backbone is the base) onto its own copy of the backbone. ``strength`` is ``1 / beta``; ``fusion`` is unused.

    Where every objective's folder holds a Dual-Head checkpoint instead (``dualhead_config.json``), those reward heads
    are decoded on the shared backbone (:class:`GenARMHeadsDecoder`; ``strength`` and ``guidance_top_k`` default to
    the first head's checkpoint settings)."""
    paths = checkpoint_paths(model.objectives, checkpoint)
    is_heads = [(path / HEADS_CONFIG_NAME).is_file() for path in paths.values()]
    if any(is_heads):
        if not all(is_heads):
            raise ValueError(f"checkpoint must name ARMs for every objective or reward heads for every objective, got {checkpoint!r}")
        heads = load_heads(paths, model)
        return GenARMHeadsDecoder(heads, heads[0].config.strength if strength is None else strength, guidance_top_k)
    arms = [load_arm(path, model.backbone, model.tokenizer, "genarm", objective)[0] for objective, path in paths.items()]
    return GenARMDecoder(model.backbone, arms, DEFAULT_STRENGTH if strength is None else strength)
