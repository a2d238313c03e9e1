"""Candidate-token cache: the frozen LM's likeliest next tokens at every response position, so training skips ``V``.

A training step's cost is the vocabulary: every response token needs ``log_softmax`` over ``V`` = 49,152 logits
for the reward head and again for the fused logits, forward and backward. The frozen LM's own logits never change,
so this cache stores, once, for each position that predicts a response token:

- ``ids`` ``(M, C + S)`` int32: the label first, then the LM's ``C - 1`` likeliest other tokens, then ``S`` tokens
  drawn (with replacement, seeded) from the LM's distribution over the remaining *tail*;
- ``logprobs`` ``(M, C)`` float32: ``log pi_LM`` of the ``C`` candidates;
- ``tail`` ``(M,)`` float32: ``log`` of the LM's probability of every other token (``-inf`` when none is left).

The heads then change the logits of those ``C + S`` tokens only (:meth:`RewardHead.candidate_shift`), and
:func:`paretoalign.losses.candidate_label_logprobs` renormalises: the candidates exactly, the tail by the mean of
``e^Δ`` over its samples (an importance-sampled estimate; with ``S = 0`` the tail keeps the LM's probabilities,
which lets a head move tail tokens without paying for it). Decoding and ``arm-accuracy`` always use the whole
vocabulary.

Files are plain ``.npy`` (memory-mapped, never unpickled) in a folder inside the feature cache, named by ``C``,
``S`` and a hash of them, the sampling seed and the response boundaries; it is built into a temporary folder and moved into
place in one rename, so an interrupted build leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .features import FeatureCache, layout_problem
from .files import atomic_directory, check_positive_int, is_int, json_text, load_array, read_json_object

META_NAME = "candidates.json"


@dataclass
class CandidateCache:
    """Packed candidate tokens of the response positions of many sequences (see the module docstring)."""

    directory: Path
    ids: np.ndarray  # (M, C + S) int32, the label in column 0, then the other candidates, then the tail samples
    logprobs: np.ndarray  # (M, C) float32 log pi_LM of the candidates
    tail: np.ndarray  # (M,) float32 log of the LM's probability outside the candidates
    offsets: np.ndarray  # (S + 1,) int64: sequence s owns rows offsets[s] .. offsets[s + 1] - 1

    @property
    def num_candidates(self) -> int:
        return self.logprobs.shape[1]

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``ids (m, C + S)``, ``logprobs (m, C)``, ``tail (m,)`` of the ``m`` positions predicting sequence ``index``'s response."""
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.ids[start:end], self.logprobs[start:end], self.tail[start:end]

    @classmethod
    def open(cls, directory: str | Path) -> "CandidateCache":
        directory = Path(directory)
        if not (directory / META_NAME).is_file():
            raise FileNotFoundError(f"no candidate cache in {str(directory)!r}")
        read_json_object(directory / META_NAME, "candidate cache file")
        ids, logprobs, tail, offsets = (
            load_array(directory / name, "candidate cache file") for name in ("ids.npy", "logprobs.npy", "tail.npy", "offsets.npy")
        )
        problem = layout_problem(offsets, {"tail.npy": tail}, {"ids.npy": ids, "logprobs.npy": logprobs})
        if problem is None and ids.shape[1] < logprobs.shape[1]:
            problem = f"ids.npy has {ids.shape[1]} columns for {logprobs.shape[1]} candidates"
        if problem:
            raise ValueError(f"candidate cache {str(directory)!r} is damaged: {problem}; delete the folder to rebuild it")
        return cls(directory, ids, logprobs, tail, offsets)


@dataclass
class CandidateBatch:
    """The candidates of a batch's response positions, in ``response_mask[:, 1:].nonzero()`` order (row-major)."""

    ids: torch.Tensor  # (N, C + S) long, the label in column 0, the tail samples last
    logprobs: torch.Tensor  # (N, C) log pi_LM of the candidates
    tail: torch.Tensor  # (N,)

    @property
    def num_candidates(self) -> int:
        return self.logprobs.shape[1]

    def to(self, device) -> "CandidateBatch":
        return CandidateBatch(self.ids.to(device), self.logprobs.to(device), self.tail.to(device))

    @staticmethod
    def cat(batches: list["CandidateBatch"]) -> "CandidateBatch":
        return CandidateBatch(*(torch.cat([getattr(b, name) for b in batches]) for name in ("ids", "logprobs", "tail")))


@torch.no_grad()
def position_candidates(
    logits: torch.Tensor, labels: torch.Tensor, num_candidates: int, tail_samples: int = 0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, ...]:
    """The label, the ``num_candidates - 1`` likeliest other tokens and ``tail_samples`` draws from the rest.

    ``(M, V)`` logits, ``(M,)`` labels -> ``ids (M, C + S)`` long (label first, tail samples last), ``logprobs (M, C)``
    of the candidates and ``tail (M,)``, the log of the probability of the ``V - C`` tokens left out (``-inf`` when
    ``C = V``; the samples of such a row are then arbitrary and weigh nothing).
    """
    vocab = logits.shape[-1]
    if not 1 <= num_candidates <= vocab:
        raise ValueError(f"num_candidates must be in [1, {vocab}] for a {vocab}-token vocabulary, got {num_candidates!r}")
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (M, V)
    others = logprobs.scatter(-1, labels[:, None], float("-inf"))  # (M, V): the label is placed first, not ranked
    top = others.topk(num_candidates - 1, dim=-1).indices  # (M, C - 1)
    ids = torch.cat([labels[:, None], top], dim=-1)  # (M, C)
    picked = logprobs.gather(-1, ids)  # (M, C)
    rest = logprobs.scatter(-1, ids, float("-inf"))  # (M, V) the tail's log-probs
    tail = rest.logsumexp(-1)  # (M,) exact, not log(1 - sum p)
    if tail_samples:
        weights = (rest - tail[:, None]).exp()  # (M, V) the LM's distribution restricted to the tail
        weights[~torch.isfinite(tail)] = 1.0  # no tail: draw anything, its weight exp(tail) is 0
        drawn = torch.multinomial(weights, tail_samples, replacement=True, generator=generator)  # (M, S)
        ids = torch.cat([ids, drawn], dim=-1)  # (M, C + S)
    return ids, picked, tail


def _boundaries_key(prompt_lengths: np.ndarray, num_candidates: int, tail_samples: int, seed: int) -> str:
    settings = {"candidates": num_candidates, "tail_samples": tail_samples, "seed": seed, "format": 2}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(np.asarray(prompt_lengths, dtype=np.int64).tobytes())
    return f"candidates-{num_candidates}-{tail_samples}-{digest.hexdigest()[:12]}"


@torch.no_grad()
def build_candidate_cache(
    lm_head: torch.nn.Module,
    feature_cache: FeatureCache,
    prompt_lengths: np.ndarray,
    num_candidates: int,
    tail_samples: int = 0,
    seed: int = 0,
    progress: bool = True,
    max_positions: int = 2048,
) -> CandidateCache:
    """Read every response position of ``feature_cache`` out through the frozen ``lm_head`` once and keep ``num_candidates``.

    Args:
        lm_head: the backbone's output embedding (``d -> V``).
        feature_cache: the final hidden states the heads train on.
        prompt_lengths: ``(S,)`` tokens before each cached sequence's response (at least 1).
        num_candidates: ``C``, the label plus the ``C - 1`` likeliest other tokens.
        tail_samples: ``S`` draws per position from the LM's distribution over the other tokens (seeded by ``seed``).
        max_positions: positions read out per ``(positions, V)`` product (memory, not results).

    Reuses a finished cache for the same sequences, boundaries, ``C``, ``S`` and seed.
    """
    prompt_lengths = np.asarray(prompt_lengths, dtype=np.int64)
    lengths = np.diff(feature_cache.offsets)  # (S,)
    if prompt_lengths.shape != lengths.shape:
        raise ValueError(f"prompt_lengths has {prompt_lengths.shape[0]} entries for {lengths.shape[0]} cached sequences")
    if (prompt_lengths < 1).any() or (prompt_lengths > lengths).any():
        bad = int(np.flatnonzero((prompt_lengths < 1) | (prompt_lengths > lengths))[0])
        raise ValueError(f"prompt_lengths[{bad}] = {prompt_lengths[bad]} is outside [1, {lengths[bad]}] (sequence {bad}'s length)")
    check_positive_int("num_candidates", num_candidates)
    if not is_int(tail_samples, 0):
        raise ValueError(f"tail_samples must be an integer >= 0, got {tail_samples!r}")
    directory = feature_cache.directory / _boundaries_key(prompt_lengths, num_candidates, tail_samples, seed)
    if (directory / META_NAME).is_file():
        return CandidateCache.open(directory)

    counts = lengths - prompt_lengths  # (S,) response tokens per sequence
    offsets = np.concatenate([[0], np.cumsum(counts)])  # (S + 1,)
    total = int(offsets[-1])
    weight = lm_head.weight
    device = weight.device

    def build(folder: Path) -> None:
        began = time.time()
        np.save(folder / "offsets.npy", offsets)
        ids = np.lib.format.open_memmap(folder / "ids.npy", mode="w+", dtype=np.int32, shape=(total, num_candidates + tail_samples))
        logprobs = np.lib.format.open_memmap(folder / "logprobs.npy", mode="w+", dtype=np.float32, shape=(total, num_candidates))
        tail = np.lib.format.open_memmap(folder / "tail.npy", mode="w+", dtype=np.float32, shape=(total,))
        pending_states, pending_labels, written = [], [], 0
        generator = torch.Generator(device=device).manual_seed(seed)

        def flush() -> None:
            nonlocal written
            if not pending_states:
                return
            states = torch.from_numpy(np.concatenate(pending_states)).to(device=device, dtype=weight.dtype)  # (m, d)
            labels = torch.from_numpy(np.concatenate(pending_labels)).to(device=device, dtype=torch.long)  # (m,)
            chunk = position_candidates(lm_head(states).float(), labels, num_candidates, tail_samples, generator)
            end = written + len(labels)
            for store, values in zip((ids, logprobs, tail), chunk):
                store[written:end] = values.cpu().numpy()
            written = end
            pending_states.clear()
            pending_labels.clear()

        pending = 0
        for sequence in tqdm(range(len(counts)), desc="caching candidate tokens", disable=not progress):
            tokens, states = feature_cache.sequence(sequence)
            start = int(prompt_lengths[sequence])
            pending_states.append(np.asarray(states[start - 1 : -1], dtype=np.float32))  # (m, d) predict tokens start..L-1
            pending_labels.append(np.asarray(tokens[start:], dtype=np.int64))  # (m,)
            pending += int(counts[sequence])
            if pending >= max_positions:
                flush()
                pending = 0
        flush()
        assert written == total, (written, total)
        for store in (ids, logprobs, tail):
            store.flush()
        meta = {
            "num_candidates": num_candidates,
            "tail_samples": tail_samples,
            "seed": seed,
            "positions": total,
            "sequences": len(counts),
            "seconds": round(time.time() - began, 1),
            "mean_tail_probability": float(np.exp(tail[:]).mean()) if total else 0.0,
        }
        (folder / META_NAME).write_text(json_text(meta))

    atomic_directory(directory, build, marker=META_NAME)
    return CandidateCache.open(directory)
