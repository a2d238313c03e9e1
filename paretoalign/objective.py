"""Score preference pairs with the heads: ARM rewards per response, fused-logit LM terms and gate values.

Only the positions that predict a response token go through the ``V``-wide heads; the gate still sees
every position (it attends over the whole history), so a batch costs about what its responses cost.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .batches import PairBatch, add_pair_sequences, collate_pairs
from .data import PreferenceCollator, PreferencePair
from .files import check_positive_int
from .losses import candidate_label_logprobs, label_logprobs, next_token_targets
from .model import DualHeadModel, fuse_logits


@dataclass
class ResponseScores:
    """What the heads say about every response token of a :class:`PairBatch`."""

    rewards: torch.Tensor  # (2B,) R = sum_t (or mean_t) log pi_r(y_t | x, y_<t) [- log pi_LM(y_t | ...)] over the response
    fused_logprobs: torch.Tensor | None  # (N,) log softmax(fused logits) at each response token
    rows: torch.Tensor  # (N,) which sequence each response token belongs to
    gate: torch.Tensor | None  # (2B, T - 1) alpha_t at the positions that predict tokens 1..T-1
    mask: torch.Tensor  # (2B, T - 1) bool, True where the predicted token is a response token
    lm_logprobs: torch.Tensor | None = None  # (N,) the frozen LM's own log-prob of each response token (a constant)
    gate_logits: torch.Tensor | None = None  # (2B, T - 1) the gate's pre-sigmoid values, sigmoid(gate_logits) = gate

    def chosen_and_rejected(self) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.rewards.shape[0] // 2
        return self.rewards[:half], self.rewards[half:]  # (B,), (B,)

    def fusion_gains(self, reduction: str = "mean") -> torch.Tensor:
        """``(2B,)``: how much the fusion raises each response's log-likelihood over the frozen LM's, summed over its
        tokens (``"mean"``: per token). A pair's chosen gain minus its rejected gain is the fused model's implicit
        reward margin (DPO's, with the LM as reference); it moves only through the gate and the reward head."""
        if self.fused_logprobs is None or self.lm_logprobs is None:
            raise ValueError("fusion_gains needs scores computed with fused=True")
        gains = self.fused_logprobs - self.lm_logprobs  # (N,)
        totals = gains.new_zeros(self.mask.shape[0]).index_add(0, self.rows, gains)  # (2B,)
        if reduction == "mean":
            totals = totals / self.mask.sum(dim=1).clamp(min=1).to(totals.dtype)
        return totals


def score_pairs(
    model: DualHeadModel,
    batch: PairBatch,
    preference: torch.Tensor,
    strength: float = 1.0,
    fused: bool = True,
    reward_grad_from_fusion: bool = True,
    exact: bool = False,
) -> ResponseScores:
    """Run the reward head (and, with ``fused``, the gate and the fusion) over cached hidden states.

    With ``batch.candidates`` (and not ``exact``) the heads are read out at each position's candidate tokens only
    (:mod:`paretoalign.candidates`): the same rewards and fused log-probs for a head that changes no other logit (with
    tail samples, an estimate of the rest's share otherwise), at a small fraction of the cost; else the whole vocabulary.

    Args:
        preference: ``(2B, k)``, one preference per sequence.
        strength: fusion strength for the fused log-probs (gate fusion, as the Dual-Head is trained).
        fused: also compute the gate and the fused log-probs; measuring rewards alone does not need them.
        reward_grad_from_fusion: let gradients of the fused log-probs reach the reward head; ``False`` detaches
            the reward logits inside the fusion, so a loss on the fused log-probs trains the gate only.
        exact: use the whole vocabulary even when the batch carries candidate tokens.
    """
    labels, mask = next_token_targets(batch.input_ids, batch.response_mask)  # (2B, T-1), (2B, T-1)
    rows, cols = mask.nonzero(as_tuple=True)  # (N,), (N,): logits at position t predict token t + 1
    selected = batch.hidden[rows, cols]  # (N, d)
    targets = labels[rows, cols]  # (N,)
    branch = model.reward_branch is not None  # the reward head reads the branch's own state, not the backbone's
    reward_selected = selected  # (N, d)
    if branch:
        states = model.reward_hidden(batch.hidden, batch.block_hidden, batch.attention_mask, preference, from_layer=batch.block_layer)
        reward_selected = states[rows, cols]  # (N, d) of the branch's (2B, T, d)
    context = model.prompt_context(batch.hidden, batch.attention_mask.bool() & ~batch.response_mask.bool())  # (2B, d) or None
    context_rows = None if context is None else context[rows]  # (N, d)
    candidates = None if exact else batch.candidates
    if candidates is not None:
        if candidates.ids.shape[0] != targets.shape[0] or not torch.equal(candidates.ids[:, 0], targets):
            raise ValueError("the batch's candidate tokens do not belong to its response tokens (label column differs)")
        count = candidates.num_candidates

        def renormalised(change: torch.Tensor) -> torch.Tensor:  # (N, C + S) change to z_LM -> (N,) log-prob of the label
            tail_change = change[:, count:] if change.shape[1] > count else None  # (N, S) at the tail samples
            return candidate_label_logprobs(candidates.logprobs, candidates.tail, change[:, :count], tail_change)

        base_selected = selected if branch else None  # z_LM is read from the backbone's state
        reward_readout = model.reward_shift(reward_selected, preference[rows], candidates.ids, base_selected, context_rows)  # (N, C + S)
        reward_token_logprobs = renormalised(reward_readout)  # (N,)
        lm_token_logprobs = candidates.logprobs[:, 0]  # (N,)

        def fused_logprobs(alpha: torch.Tensor, change: torch.Tensor) -> torch.Tensor:  # gate fusion: z_LM + s·alpha·Δ
            return renormalised((strength * alpha)[:, None] * change)  # (N,)

    else:
        lm_logits = model.lm_logits(selected)  # (N, V)
        shared = None if branch else lm_logits  # a branch's state is read out by the reward head itself
        reward_readout = model.reward_logits(
            reward_selected[:, None], preference[rows], None if shared is None else shared[:, None], context_rows
        )[:, 0]  # (N, V) z_RM
        reward_token_logprobs = label_logprobs(reward_readout, targets)  # (N,)
        with torch.no_grad():
            lm_token_logprobs = label_logprobs(lm_logits, targets)  # (N,) the frozen LM's own, a constant

        def fused_logprobs(alpha: torch.Tensor, reward_logits: torch.Tensor) -> torch.Tensor:
            return label_logprobs(fuse_logits(lm_logits, reward_logits, alpha, "gate", strength), targets)  # (N,)

    if model.config.reward_baseline == "backbone":
        reward_token_logprobs = reward_token_logprobs - lm_token_logprobs  # (N,) the head's change
    rewards = reward_token_logprobs.new_zeros(batch.input_ids.shape[0]).index_add(0, rows, reward_token_logprobs)  # (2B,)
    if model.config.reward_reduction == "mean":
        rewards = rewards / mask.sum(dim=1).clamp(min=1).to(rewards.dtype)  # (2B,) per response token
    if not fused:
        return ResponseScores(rewards, None, rows, None, mask)
    gate_logits, _ = model.gate(batch.hidden, batch.attention_mask, preference, logits=True)  # (2B, T)
    alpha = torch.sigmoid(gate_logits)  # (2B, T)
    # reward_readout: z_RM - z_LM at the candidates and tail samples (N, C + S), or z_RM over the vocabulary (N, V)
    fusion_reward = reward_readout if reward_grad_from_fusion else reward_readout.detach()
    fused_token_logprobs = fused_logprobs(alpha[rows, cols], fusion_reward)  # (N,)
    return ResponseScores(rewards, fused_token_logprobs, rows, alpha[:, :-1], mask, lm_token_logprobs.detach(), gate_logits[:, :-1])


@torch.no_grad()
def pair_margins(
    model: DualHeadModel,
    pairs: Sequence[PreferencePair],
    preferences: Sequence[Sequence[float]],
    batch_pairs: int = 8,
    max_length: int = 512,
    max_prompt_length: int = 384,
    progress: bool = False,
    feature_cache: str | os.PathLike | None = None,
    feature_dtype: str = "float32",
) -> list[list[float]]:
    """Per preference, every pair's reward margin ``R(chosen) - R(rejected)`` (one list of ``len(pairs)`` per
    preference), every preference scored from the same hidden states.

    With ``feature_cache`` (a folder, e.g. the user cache ``~/.cache/paretoalign/features`` that training uses), the
    backbone's states come from a feature cache of these pairs' sequences, built once
    (:func:`~paretoalign.features.build_feature_cache` copies every sequence another cache there already holds): a
    second evaluation of the same pairs, at other preferences or with other heads on the same backbone, skips the
    backbone; ``feature_dtype`` is the precision of that cache's build (as in training: ``"bfloat16"`` reads a
    bf16-computed cache). Without it the backbone runs once per pair and nothing is written.
    """
    if not pairs:
        raise ValueError("pairs is empty: nothing to measure")
    check_positive_int("batch_pairs", batch_pairs)
    collator = PreferenceCollator(model.tokenizer, max_length, max_prompt_length)
    model.eval()
    margins: list[list[float]] = [[] for _ in preferences]
    for batch in _pair_batches(model, collator, list(pairs), batch_pairs, progress, feature_cache, feature_dtype):
        for index, preference in enumerate(preferences):
            rows = model.preference_batch(preference, batch.input_ids.shape[0])  # (2B, k)
            chosen, rejected = score_pairs(model, batch, rows, fused=False).chosen_and_rejected()
            margins[index].extend((chosen - rejected).tolist())
    return margins


def arm_accuracy(model: DualHeadModel, pairs: Sequence[PreferencePair], preferences: Sequence[Sequence[float]], **options) -> list[dict]:
    """How often the reward head gives the chosen reply the higher reward, at each of ``preferences``: one
    ``{"preference", "accuracy", "n", "mean_margin"}`` per preference, from :func:`pair_margins` (``options``: its
    batching, lengths, progress and feature cache)."""
    return accuracy_entries(preferences, pair_margins(model, pairs, preferences, **options))


def accuracy_entries(preferences: Sequence[Sequence[float]], margins: Sequence[Sequence[float]]) -> list[dict]:
    """``{"preference", "accuracy", "n", "mean_margin"}`` per preference from each preference's pair margins."""
    return [
        {
            "preference": [float(w) for w in preference],
            "accuracy": sum(m > 0 for m in found) / len(found),
            "n": len(found),
            "mean_margin": sum(found) / len(found),
        }
        for preference, found in zip(preferences, margins)
    ]


def paired_accuracy_difference(margins: Sequence[float], other: Sequence[float]) -> dict:
    """Accuracy from ``margins`` minus accuracy from ``other``, margins of the same pairs (e.g. at two preferences),
    with the paired standard error ``std(d, ddof=1) / sqrt(n)`` of the per-pair differences ``d`` in correctness.

    Returns ``{"difference", "paired_se", "n"}`` (``paired_se`` ``None`` for a single pair).
    """
    if len(margins) != len(other) or not margins:
        raise ValueError(f"paired margins need the same pairs on both sides, got {len(margins)} and {len(other)}")
    import numpy as np

    d = (np.asarray(margins, dtype=float) > 0).astype(float) - (np.asarray(other, dtype=float) > 0)  # (n,)
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else None
    return {"difference": float(d.mean()), "paired_se": se, "n": int(d.size)}


def _pair_batches(
    model: DualHeadModel, collator: PreferenceCollator, pairs: list[PreferencePair], batch_pairs: int, progress: bool, feature_cache, feature_dtype: str
):
    """:class:`PairBatch` es of ``batch_pairs`` pairs (chosen rows, then rejected), from a feature cache or the backbone."""
    if feature_cache is not None:
        import numpy as np

        from .features import build_feature_cache

        sequences: list[list[int]] = []
        index = add_pair_sequences(collator, pairs, sequences)
        cache = build_feature_cache(model, sequences, feature_cache, progress=progress, compute_dtype=feature_dtype)
        block = None
        if model.branch_layer is not None:
            block = build_feature_cache(model, sequences, feature_cache, progress=progress, layer=model.branch_layer, compute_dtype=feature_dtype)
        for start in tqdm(range(0, len(pairs), batch_pairs), desc="scoring pairs", disable=not progress):
            ids = np.arange(start, min(start + batch_pairs, len(pairs)))
            yield collate_pairs(cache, index, ids, block, model.branch_layer).to(model.device)
        return
    for start in tqdm(range(0, len(pairs), batch_pairs), desc="scoring pairs", disable=not progress):
        encoded = collator(pairs[start : start + batch_pairs])
        sides = ("chosen", "rejected")
        input_ids = torch.cat([encoded[f"{side}_input_ids"] for side in sides]).to(model.device)  # (2B, T)
        attention_mask = torch.cat([encoded[f"{side}_attention_mask"] for side in sides]).to(model.device)  # (2B, T)
        response_mask = torch.cat([encoded[f"{side}_response_mask"] for side in sides]).to(model.device)  # (2B, T)
        hidden, block_hidden = model.backbone_states(input_ids, attention_mask)  # (2B, T, d) each (block: or None)
        yield PairBatch(hidden, input_ids, attention_mask, response_mask, block_hidden, model.branch_layer)
