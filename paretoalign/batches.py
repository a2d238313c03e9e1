"""Training data as batches: where each pair's sequences sit in the feature cache, and the padded tensors a step reads.

Pairs become token sequences once (:func:`add_pair_sequences`, :func:`add_onpolicy_sequences`), the backbone's states
of every sequence are cached (:mod:`paretoalign.features`), and a step collates a few pairs' cached states into a
:class:`PairBatch` (:func:`collate_pairs`). Which pairs and which preference a step sees are pure functions of the step
(:func:`batch_pair_ids`, :func:`step_preference`), so every trainer (Dual-Head heads, GenARM and PARM ARMs) draws the same
data and a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .candidates import CandidateBatch, CandidateCache
from .data import PreferenceCollator, PreferencePair, read_replies
from .features import FeatureCache
from .losses import sample_preference


@dataclass
class OnPolicyGroup:
    """The sampled replies of one prompt (from every folder that sampled it): their sequences in the feature cache."""

    rows: np.ndarray  # (k,) sequence indices
    prompt_length: int
    source: str | None  # the prompt's data source (e.g. "harmless-base"), which says whether it is a red-team prompt
    texts: list[str]  # the replies, to skip pairs of identical replies
    prompt_id: str = ""
    folders: list[str] = field(default_factory=list)  # the sampling folder of each reply


@dataclass
class PairBatch:
    """``B`` pairs as ``2B`` sequences: rows ``0..B-1`` chosen, rows ``B..2B-1`` rejected."""

    hidden: torch.Tensor  # (2B, T, d) backbone final hidden states
    input_ids: torch.Tensor  # (2B, T)
    attention_mask: torch.Tensor  # (2B, T)
    response_mask: torch.Tensor  # (2B, T)
    block_hidden: torch.Tensor | None = None  # (2B, T, d) input of block ``block_layer``, for a reward branch
    block_layer: int | None = None
    candidates: CandidateBatch | None = None  # the frozen LM's likeliest tokens at the response positions (training)
    sampled: torch.Tensor | None = None  # (2B,) bool: the reply is the backbone's own sample (on-policy), not human-written

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device) -> "PairBatch":
        tensors = (self.hidden, self.input_ids, self.attention_mask, self.response_mask)
        block = None if self.block_hidden is None else self.block_hidden.to(device)
        candidates = None if self.candidates is None else self.candidates.to(device)
        sampled = None if self.sampled is None else self.sampled.to(device)
        return PairBatch(*(t.to(device) for t in tensors), block, self.block_layer, candidates, sampled)


def _pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the batch, left-padding dimension 1 to the longest (zeros are padding everywhere here)."""
    longest = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        pad = torch.zeros((t.shape[0], longest - t.shape[1], *t.shape[2:]), dtype=t.dtype, device=t.device)
        padded.append(torch.cat([pad, t], dim=1))  # (b, T_max, ...)
    return torch.cat(padded, dim=0)


def join_pair_batches(batches: list[PairBatch]) -> PairBatch:
    """One :class:`PairBatch` of several (one per objective), left-padded to the longest; rows keep their order."""
    layers = {b.block_layer for b in batches}
    if len(layers) != 1 or len({b.block_hidden is None for b in batches}) != 1:
        raise ValueError("batches to join must all carry block states of the same layer, or none")
    if len({b.candidates is None for b in batches}) != 1:
        raise ValueError("batches to join must all carry candidate tokens, or none")
    names = ("hidden", "input_ids", "attention_mask", "response_mask")
    block = None if batches[0].block_hidden is None else _pad_cat([b.block_hidden for b in batches])
    # Rows keep their order and padding is on the left, so the response positions stay in row-major order.
    candidates = None if batches[0].candidates is None else CandidateBatch.cat([b.candidates for b in batches])
    sampled = None if any(b.sampled is None for b in batches) else torch.cat([b.sampled for b in batches])
    return PairBatch(*(_pad_cat([getattr(b, name) for b in batches]) for name in names), block, layers.pop(), candidates, sampled)


@dataclass
class PairIndex:
    """Where each pair's chosen and rejected sequences sit in the feature cache."""

    chosen: np.ndarray  # (P,) sequence index of the chosen reply
    rejected: np.ndarray  # (P,) sequence index of the rejected reply
    prompt_length: np.ndarray  # (P,) tokens of prompt before the reply

    def select(self, keep: np.ndarray, swap: np.ndarray | None = None) -> "PairIndex":
        """The pairs where ``keep`` ``(P,)`` is true, with chosen and rejected exchanged where ``swap`` (``(P,)``) is."""
        chosen, rejected = self.chosen, self.rejected
        if swap is not None:
            chosen, rejected = np.where(swap, rejected, chosen), np.where(swap, chosen, rejected)
        return PairIndex(chosen[keep], rejected[keep], self.prompt_length[keep])

    @staticmethod
    def concat(parts: list["PairIndex"]) -> "PairIndex":
        return PairIndex(*(np.concatenate([getattr(part, name) for part in parts]) for name in ("chosen", "rejected", "prompt_length")))


@dataclass
class PreparedData:
    cache: FeatureCache
    train: dict[str, PairIndex]
    validation: dict[str, PairIndex]
    block_cache: FeatureCache | None = None  # the same sequences' input of block ``block_layer`` (reward branch)
    block_layer: int | None = None
    candidates: CandidateCache | None = None  # candidate tokens of every response position (``candidate_tokens``)
    teacher_report: dict | None = None  # what the teachers labelled (``teacher_objectives``)
    conflicts: dict | None = None  # {(objective, teacher objective): validation pairs the two label opposite ways}
    onpolicy_scores: list[dict] | None = None  # each sampled prompt's teacher reward per reply and objective
    first_sampled: int | None = None  # cached sequences from this index on are the backbone's own replies (onpolicy)
    teachers: dict | None = None  # {objective: teachers.Teacher} that labelled the pairs, thresholds calibrated

    def collate(self, index: PairIndex, pair_ids: np.ndarray, candidates: bool = True) -> PairBatch:
        """The pairs ``pair_ids`` of ``index`` as a :class:`PairBatch`, with the block states and (``candidates``)
        the candidate tokens when cached."""
        first_sampled = len(self.cache) if self.first_sampled is None else self.first_sampled
        batch = collate_pairs(self.cache, index, pair_ids, self.block_cache, self.block_layer, first_sampled)
        if candidates and self.candidates is not None:
            batch.candidates = collate_candidates(self.candidates, index, pair_ids)
        return batch


def subsample(pairs: list[PreferencePair], limit: int | None, seed: int) -> list[PreferencePair]:
    if limit is None or len(pairs) <= limit:
        return pairs
    keep = np.random.default_rng(seed).permutation(len(pairs))[:limit]
    return [pairs[i] for i in sorted(keep)]


def add_pair_sequences(collator: PreferenceCollator, pairs: list[PreferencePair], sequences: list[list[int]]) -> PairIndex:
    """Tokenize ``pairs``, append their chosen and rejected sequences to ``sequences``, and say where they went."""
    chosen, rejected, prompt_lengths = [], [], []
    for pair in pairs:
        chosen_ids, rejected_ids, prompt_length = collator.encode_pair(pair)
        chosen.append(len(sequences))
        sequences.append(chosen_ids)
        rejected.append(len(sequences))
        sequences.append(rejected_ids)
        prompt_lengths.append(prompt_length)
    return PairIndex(np.array(chosen), np.array(rejected), np.array(prompt_lengths))


def add_onpolicy_sequences(
    collator: PreferenceCollator, folders: list[str], sequences: list[list[int]], exclude_sources: tuple[str, ...] = ()
) -> list[OnPolicyGroup]:
    """Tokenize the sampled replies of ``folders`` (prompt + reply, no eos after a reply cut off by the length
    limit), append them to ``sequences``, and say where each prompt's replies went: one group per prompt, holding
    its replies from every folder (e.g. free replies and replies sampled from a declining opening), so pairs form
    across folders too. Prompts of ``exclude_sources`` (e.g. PKU-SafeRLHF's, under its non-commercial license) are
    left out."""
    groups: dict[str, OnPolicyGroup] = {}
    for folder in folders:
        lines = read_replies(folder)
        if not lines:
            raise ValueError(f"onpolicy folder {folder!r} holds no sampled replies (paretoalign sample-replies writes them)")
        for line in lines:
            if line.get("source") in exclude_sources:
                continue
            prompt = line["prompt"] if isinstance(line["prompt"], list) else [{"role": "user", "content": line["prompt"]}]
            prompt_ids = collator.prompt_ids(prompt)
            budget = collator.max_length - len(prompt_ids)
            rows = []
            for reply, finish in zip(line["replies"], line["finish"]):
                rows.append(len(sequences))
                sequences.append(prompt_ids + (collator.response_ids(reply, budget, eos=finish == "eos") or [collator.tokenizer.eos_token_id]))
            group = groups.setdefault(line["prompt_id"], OnPolicyGroup(np.zeros(0, dtype=np.int64), len(prompt_ids), line.get("source"), [], line["prompt_id"]))
            group.rows = np.concatenate([group.rows, np.array(rows, dtype=np.int64)])
            group.texts += list(line["replies"])
            group.folders += [str(folder)] * len(rows)
    return list(groups.values())


def collate_pairs(
    cache: FeatureCache,
    index: PairIndex,
    pair_ids: np.ndarray,
    block_cache: FeatureCache | None = None,
    block_layer: int | None = None,
    first_sampled: int | None = None,
) -> PairBatch:
    """Left-padded :class:`PairBatch` of the chosen then the rejected sequences of ``pair_ids``.

    ``block_cache`` (the same sequences' input of block ``block_layer``) fills ``block_hidden``; with
    ``first_sampled`` (the index of the cache's first on-policy sequence) the batch marks the sampled replies.
    """
    rows = np.concatenate([index.chosen[pair_ids], index.rejected[pair_ids]])  # (2B,)
    prompt_lengths = np.concatenate([index.prompt_length[pair_ids]] * 2)  # (2B,)
    lengths = [int(cache.offsets[r + 1] - cache.offsets[r]) for r in rows]
    longest, width = max(lengths), cache.hidden.shape[1]
    hidden = torch.zeros(len(rows), longest, width)  # (2B, T, d)
    block_hidden = None if block_cache is None else torch.zeros(len(rows), longest, width)  # (2B, T, d)
    input_ids = torch.zeros(len(rows), longest, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros(len(rows), longest, dtype=torch.long)  # (2B, T)
    response_mask = torch.zeros(len(rows), longest, dtype=torch.long)  # (2B, T)
    for i, (row, length, prompt_length) in enumerate(zip(rows, lengths, prompt_lengths)):
        tokens, states = cache.sequence(int(row))
        start = longest - length
        input_ids[i, start:] = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        hidden[i, start:] = torch.from_numpy(np.asarray(states, dtype=np.float32))
        if block_hidden is not None:
            block_tokens, block_states = block_cache.sequence(int(row))
            if not np.array_equal(block_tokens, tokens):
                raise ValueError(f"feature caches {cache.directory} and {block_cache.directory} hold different sequences")
            block_hidden[i, start:] = torch.from_numpy(np.asarray(block_states, dtype=np.float32))
        attention_mask[i, start:] = 1
        response_mask[i, start + int(prompt_length) :] = 1
    sampled = None if first_sampled is None else torch.from_numpy(rows >= first_sampled)  # (2B,)
    return PairBatch(hidden, input_ids, attention_mask, response_mask, block_hidden, block_layer, sampled=sampled)


def sequence_prompt_lengths(indices: list[PairIndex], num_sequences: int) -> np.ndarray:
    """``(S,)`` prompt tokens before each cached sequence's reply, from the pair indices that placed them."""
    prompt_lengths = np.zeros(num_sequences, dtype=np.int64)
    for index in indices:
        prompt_lengths[index.chosen] = prompt_lengths[index.rejected] = index.prompt_length
    return prompt_lengths


def collate_candidates(candidates: CandidateCache, index: PairIndex, pair_ids: np.ndarray) -> CandidateBatch:
    """The candidate tokens of the batch :func:`collate_pairs` makes from the same pairs, in its row-major order."""
    rows = np.concatenate([index.chosen[pair_ids], index.rejected[pair_ids]])  # (2B,)
    parts = [candidates.sequence(int(row)) for row in rows]
    ids, logprobs, tail = (np.concatenate([part[i] for part in parts]) for i in range(3))
    return CandidateBatch(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(np.array(logprobs)), torch.from_numpy(np.array(tail)))


def batch_pair_ids(num_pairs: int, batch_size: int, step: int, seed: int, stream: int) -> np.ndarray:
    """The pairs of ``step``: consecutive slices of per-epoch permutations, a pure function of its arguments."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // num_pairs, positions % num_pairs
    permutations = {e: np.random.default_rng([seed, stream, int(e)]).permutation(num_pairs) for e in np.unique(epochs)}
    return np.array([permutations[e][o] for e, o in zip(epochs, offsets)])


def step_preference(num_objectives: int, step: int, seed: int, concentration: float) -> torch.Tensor:
    """The step's ``w ~ Dirichlet``: ``(k,)``, a pure function of ``(seed, step)``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return sample_preference(num_objectives, generator, concentration)


def step_pair_ids(
    index: PairIndex, first_sampled: int | None, batch_pairs: int, step: int, seed: int, stream: int,
    written_share: float | None = None, name: str = "objective",
) -> tuple[PairIndex, np.ndarray]:
    """One objective's pairs of ``step``: the index to collate from and the pair ids in it.

    ``written_share`` ``None`` draws every pair of ``index`` equally often (:func:`batch_pair_ids`). A share draws
    ``round(share * batch_pairs)`` of the step's pairs from the human-written pairs and the rest from the pairs of the
    backbone's own replies (sequences from ``first_sampled`` on), each pool through its own permutations, so a small
    pool of human pairs is seen more often than its share of the whole would give.
    """
    if written_share is None:
        return index, batch_pair_ids(len(index.chosen), batch_pairs, step, seed, stream)
    sampled = np.zeros(len(index.chosen), bool) if first_sampled is None else (index.chosen >= first_sampled) | (index.rejected >= first_sampled)
    written = round(written_share * batch_pairs)
    parts, ids = [], []
    for kind, keep, count, pool_stream in (("human-written", ~sampled, written, stream), ("on-policy", sampled, batch_pairs - written, 1_000 + stream)):
        pool = index.select(keep)
        if count and not len(pool.chosen):
            raise ValueError(f"written_pair_share[{name!r}] {written_share!r} draws {kind} pairs, but {name} has none")
        if count:
            ids.append(sum(len(part.chosen) for part in parts) + batch_pair_ids(len(pool.chosen), count, step, seed, pool_stream))
        parts.append(pool)
    return PairIndex.concat(parts), np.concatenate(ids)
