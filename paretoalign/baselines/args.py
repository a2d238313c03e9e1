"""ARGS decoding: each step the backbone's top-k tokens are rescored by trajectory-level reward models.

    score(v) = z_base(v | x, y_<t) + weight · sum_i w_i · r_i(x, y_<t v)     for v in the top-k of z_base

``r`` is a :class:`~paretoalign.scorers.rewards.RewardScorer` reading the prompt and the partial answer plus the
candidate as text. Tokens outside the top-k get ``-inf``, so greedy decoding picks the best rescored candidate and
sampling draws among the rescored candidates only. When the scorer is also the sweep's evaluator (the default),
ARGS optimises the very rewards it is judged by: keep that in mind when comparing fronts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..files import check_positive_int
from ..generation import BaseDecoder, StepOutput, eos_token_ids

DEFAULT_CANDIDATES = 10
DEFAULT_WEIGHT = 1.0


def _reward_modules(scorer) -> list[nn.Module]:
    """The modules a scorer holds (its reward models), so the sweep's pass counter sees their forward passes."""
    if isinstance(getattr(type(scorer), "encoder", None), property):
        scorer.encoder  # noqa: B018 - a lazily loaded encoder (the MiniLM scorer) is loaded now, not mid-decoding
    modules: list[nn.Module] = []
    for value in vars(scorer).values():
        values = value.values() if isinstance(value, Mapping) else [value]
        modules += [item for item in values if isinstance(item, nn.Module)]
    return modules


class ARGSDecoder:
    """ARGS over ``backbone``: the top ``candidates`` tokens of each step rescored with ``weight · (w · r)``.

    Args:
        scorer: a reward scorer (``objectives``, ``score(prompts, responses, batch_size) -> (n, k)``, higher is better)
            covering every objective of the preference.
        objectives: the preference's objective names, in column order.
        candidates: ARGS's ``k``, the tokens rescored per step.
        weight: ARGS's ``w``, the reward's weight against the logit (0 gives plain top-k decoding).
        scorer_batch_size: texts per scorer batch.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        scorer,
        objectives: Sequence[str],
        candidates: int = DEFAULT_CANDIDATES,
        weight: float = DEFAULT_WEIGHT,
        scorer_batch_size: int = 64,
    ):
        check_positive_int("candidates (ARGS's k)", candidates)
        if not (isinstance(weight, (int, float)) and math.isfinite(weight)):
            raise ValueError(f"weight must be a finite number, got {weight!r}")
        check_positive_int("scorer_batch_size", scorer_batch_size)
        names = list(getattr(scorer, "objectives", ()))
        missing = [name for name in objectives if name not in names]
        if missing:
            raise ValueError(f"the scorer's objectives {names} lack {missing}, which the preference weighs")
        self.backbone, self.tokenizer, self.scorer = backbone, tokenizer, scorer
        self.columns = [names.index(name) for name in objectives]  # scorer column of each preference column
        self.reward_models = nn.ModuleList(_reward_modules(scorer))
        self.candidates, self.weight, self.scorer_batch_size = candidates, float(weight), scorer_batch_size
        self.model_passes_per_token = 1  # backbone passes; the scorer reads candidates x rows texts on top of it
        self.scorer_passes = 0  # batched scorer forward passes so far; the sweep adds them to the model passes
        self.reward_evaluations_per_token = candidates
        self.eos_ids = set(eos_token_ids(tokenizer, backbone))
        self._base = BaseDecoder(backbone)
        self.prompts: list = []
        self.answers: list[list[int]] = []
        self.finished: list[bool] = []
        self.preference: torch.Tensor | None = None

    def trainable_parameters(self) -> int:
        """ARGS trains nothing itself; its reward models are the scorer's (counted by the scorer when it says so)."""
        own = getattr(self.scorer, "trainable_parameters", None)
        return int(own()) if callable(own) else 0

    def rescore(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, V)`` base logits -> ``(B, V)`` scores: the rescored top-k, ``-inf`` elsewhere.

        Rows that have finished keep their top-k logits unscored (their tokens are padding from now on).
        """
        top = logits.float().topk(min(self.candidates, logits.shape[-1]), dim=-1)  # values, indices: (B, c)
        values = top.values.clone()  # (B, c)
        rows = [row for row, done in enumerate(self.finished) if not done]
        if rows and self.weight != 0:
            count = top.indices.shape[1]
            candidates = top.indices[rows].tolist()  # (R, c)
            texts = [
                self.tokenizer.decode(self.answers[row] + [token], skip_special_tokens=True)
                for row, tokens in zip(rows, candidates)
                for token in tokens
            ]
            prompts = [self.prompts[row] for row in rows for _ in range(count)]
            rewards = np.asarray(
                self.scorer.score(prompts, texts, batch_size=self.scorer_batch_size), dtype=np.float64
            )  # (R c, n)
            self.scorer_passes += -(-len(texts) // self.scorer_batch_size)  # the scorer's batched forward passes
            if rewards.shape != (len(texts), len(self.scorer.objectives)):
                raise ValueError(
                    f"scorer returned shape {rewards.shape} for {len(texts)} texts and objectives {list(self.scorer.objectives)}"
                )
            rewards = torch.as_tensor(rewards[:, self.columns], dtype=values.dtype, device=values.device)  # (R c, k)
            rewards = rewards.view(len(rows), count, len(self.columns))  # (R, c, k)
            combined = (rewards * self.preference[rows][:, None, :]).sum(-1)  # (R, c): w · r per candidate
            values[rows] = values[rows] + self.weight * combined  # (R, c)
        return torch.full_like(logits, -math.inf, dtype=values.dtype).scatter(1, top.indices, values)  # (B, V)

    def start(self, input_ids, attention_mask, preference, prompts=None) -> StepOutput:
        """``prompts``: what each row answers (text or messages, :func:`~paretoalign.generation.answered_prompt`): the
        scorer reads it beside each candidate answer."""
        if preference.shape[-1] != len(self.columns):
            raise ValueError(f"preference has {preference.shape[-1]} weights, the decoder {len(self.columns)} objectives")
        if prompts is None or len(prompts) != input_ids.shape[0]:
            found = None if prompts is None else len(prompts)
            raise ValueError(f"ARGS scores each row's prompt as text: start() needs prompts, one per row ({input_ids.shape[0]}), got {found}")
        self.preference = preference.float()  # (B, k)
        self.prompts = list(prompts)
        self.answers = [[] for _ in range(input_ids.shape[0])]
        self.finished = [False] * input_ids.shape[0]
        return StepOutput(self.rescore(self._base.start(input_ids, attention_mask, preference).logits))

    def step(self, tokens, attention_mask) -> StepOutput:
        for row, token in enumerate(tokens[:, 0].tolist()):
            if self.finished[row]:
                continue
            if token in self.eos_ids:
                self.finished[row] = True
            else:
                self.answers[row].append(token)
        return StepOutput(self.rescore(self._base.step(tokens, attention_mask).logits))


def build_decoder(
    model,
    strength: float | None = None,
    fusion: str | None = None,
    scorer=None,
    candidates: int = DEFAULT_CANDIDATES,
    weight: float | None = None,
    scorer_batch_size: int = 64,
    **options,
) -> ARGSDecoder:
    """The ``args`` method over ``model``'s backbone.

    Args:
        scorer: a scorer object, or a spec for :func:`~paretoalign.scorers.rewards.load_scorer` (``None``: the
            shipped default, which is also the sweep's default evaluator).
        weight: ARGS's reward weight; defaults to ``strength`` (the sweep's steering strength), else 1.
        fusion: unused.
    """
    if scorer is None or isinstance(scorer, str) or hasattr(scorer, "__fspath__"):
        from ..scorers.rewards import load_scorer

        scorer = load_scorer(scorer, device=model.device)
    weight = weight if weight is not None else strength if strength is not None else DEFAULT_WEIGHT
    return ARGSDecoder(model.backbone, model.tokenizer, scorer, model.objectives, candidates, weight, scorer_batch_size)
