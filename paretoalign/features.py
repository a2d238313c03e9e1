"""On-disk cache of the frozen backbone's hidden states, so that training steps never run the backbone.

Sequences are stored packed (no padding): ``tokens.npy`` (N,) int32, ``hidden.npy`` (N, d) float16 and
``offsets.npy`` (S + 1,) int64, all plain ``.npy`` files opened as memory maps (never unpickled). A build
writes batch after batch and records its progress atomically, so an interrupted build resumes where it
stopped; the cache directory is named by a hash of the backbone, the tokenizer and the token sequences.

A cache is content-addressed per sequence too: a new build copies the states of every sequence that a complete
cache under the same root already holds (same backbone, tokenizer and layer) and runs the backbone on the others
only, so adding replies to a training set costs the new replies, not the whole set again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbone import weights_dtype
from .files import atomic_write, file_lock, is_int, load_array, read_json_object
from .model import DualHeadModel, backbone_forward

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
COMPUTE_DTYPES = ("float32", "bfloat16")


def check_compute_dtype(name) -> str:
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
    return name


def effective_compute_dtype(model: DualHeadModel, requested: str = "float32") -> str:
    """The precision a cache build's matmuls run in: bf16 when asked for or when the backbone's weights are bf16."""
    check_compute_dtype(requested)
    return "bfloat16" if requested == "bfloat16" or weights_dtype(model.backbone) == torch.bfloat16 else "float32"


def cache_header(model: DualHeadModel, extra: dict | None = None) -> dict:
    """What the states depend on besides the tokens: backbone weights, tokenizer, width (and ``extra``: the layer)."""
    return {
        "format": FORMAT_VERSION,
        "backbone": model.config.weights_fingerprint,
        "tokenizer": model.config.tokenizer_fingerprint,
        "hidden_size": model.config.hidden_size,
        **(extra or {}),
    }


def sequences_key(model: DualHeadModel, sequences: Sequence[Sequence[int]], extra: dict | None = None) -> str:
    """A hash naming the cache: backbone weights, tokenizer, and every token of every sequence."""
    return _key(cache_header(model, extra), sequences)


def _key(header: dict, sequences: Sequence[Sequence[int]]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(header, sort_keys=True).encode())
    for sequence in sequences:
        digest.update(np.asarray(sequence, dtype=np.int32).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:20]


def sequence_digests(sequences: Sequence[Sequence[int]]) -> list[bytes]:
    """A 16-byte content hash of each token sequence."""
    return [hashlib.blake2b(np.asarray(s, dtype=np.int32).tobytes(), digest_size=16).digest() for s in sequences]


def block_input(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
    """The residual stream entering block ``layer`` of ``backbone``: ``(B, T)`` ids -> ``(B, T, d)``."""
    out = backbone_forward(backbone, input_ids, attention_mask, output_hidden_states=True)
    # hidden_states[0] is the embedding output and hidden_states[i] the output of block i - 1; the last entry is
    # the final (normed) state, which is why ``layer`` stays below the number of blocks.
    return out.hidden_states[layer]


@dataclass
class FeatureCache:
    """Packed token ids and hidden states of many sequences, memory-mapped from a cache directory."""

    directory: Path
    tokens: np.ndarray  # (N,) int32
    hidden: np.ndarray  # (N, d) float16
    offsets: np.ndarray  # (S + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids ``(L,)`` and hidden states ``(L, d)`` of sequence ``index``."""
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.tokens[start:end], self.hidden[start:end]

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "FeatureCache":
        """The complete cache in ``directory``, its files checked against each other (a damaged one raises
        ``ValueError`` naming it; deleting the folder makes the next build recompute it)."""
        directory = Path(directory)
        meta = _read_json(directory / "meta.json")
        if not meta or not meta.get("complete"):
            raise FileNotFoundError(f"no complete feature cache in {str(directory)!r}")
        tokens, hidden, offsets = (load_array(directory / name, "feature cache file") for name in ("tokens.npy", "hidden.npy", "offsets.npy"))
        problem = layout_problem(offsets, {"tokens.npy": tokens}, {"hidden.npy": hidden}, meta.get("sequences"))
        if problem is None and hidden.shape[1] != meta.get("hidden_size", hidden.shape[1]):
            problem = f"hidden.npy holds {hidden.shape[1]}-wide states, meta.json says {meta['hidden_size']}"
        if problem:
            raise ValueError(f"feature cache {str(directory)!r} is damaged: {problem}; delete the folder to rebuild it")
        return cls(directory, tokens, hidden, offsets)


def layout_problem(offsets: np.ndarray, flat: dict, rows: dict, sequences: int | None = None) -> str | None:
    """What is inconsistent in a packed cache (``offsets`` into arrays ``flat`` (N,) and ``rows`` (N, w)), or None."""
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or (np.diff(offsets) < 0).any():
        return "offsets.npy is not a list of increasing positions from 0"
    if sequences is not None and len(offsets) - 1 != sequences:
        return f"offsets.npy holds {len(offsets) - 1} sequences, meta.json says {sequences}"
    for name, array in [*flat.items(), *rows.items()]:
        if array.ndim != (1 if name in flat else 2) or array.shape[0] != offsets[-1]:
            return f"{name} has shape {tuple(array.shape)}, the offsets need {int(offsets[-1])} rows"
    return None


def feature_cache_root(folder: str | os.PathLike | None = None) -> Path:
    """Where feature caches live: ``folder``, else ``features/`` under the user cache (``$PARETOALIGN_CACHE``)."""
    from .backbone import cache_dir

    return Path(folder).expanduser() if folder else cache_dir() / "features"


def _read_json(path: Path) -> dict | None:
    return read_json_object(path, "feature cache file") if path.is_file() else None


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _batches(lengths: np.ndarray, max_tokens: int, rows: np.ndarray | None = None) -> list[list[int]]:
    """Group sequence indices (``rows``, default all) of similar length into batches of at most ``max_tokens``
    padded tokens."""
    rows = np.arange(len(lengths)) if rows is None else np.asarray(rows)
    order = rows[np.argsort(lengths[rows], kind="stable")]
    batches, current = [], []
    for index in order:
        if current and (len(current) + 1) * lengths[index] > max_tokens:
            batches.append(current)
            current = []
        current.append(int(index))
    if current:
        batches.append(current)
    return batches


def _copy_from_donors(root: Path, directory: Path, header: dict, digests: list[bytes], offsets: np.ndarray, hidden_store) -> np.ndarray:
    """Copy into ``hidden_store`` the states of every sequence a complete cache under ``root`` with the same
    ``header`` holds; returns ``(S,)`` bool, true where a sequence still needs the backbone."""
    pending = np.ones(len(digests), dtype=bool)
    where = {digest: i for i, digest in enumerate(digests)}
    for donor_dir in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            meta = _read_json(donor_dir / "meta.json") if donor_dir != directory and donor_dir.is_dir() else None
            if not meta or not meta.get("complete") or meta.get("header", header) != header:
                continue
            donor = FeatureCache.open(donor_dir)
        except (ValueError, FileNotFoundError) as error:
            logger.warning("not reusing another feature cache: %s", error)  # a damaged neighbour costs a recompute, not the build
            continue
        donor_tokens = [donor.tokens[donor.offsets[i] : donor.offsets[i + 1]] for i in range(len(donor))]
        if "header" not in meta and _key(header, donor_tokens) != donor_dir.name:
            continue  # a cache written before headers were recorded: its name proves what it was built from
        for donor_index, digest in enumerate(sequence_digests(donor_tokens)):
            row = where.get(digest)
            if row is None or not pending[row]:
                continue
            hidden_store[offsets[row] : offsets[row + 1]] = donor.hidden[donor.offsets[donor_index] : donor.offsets[donor_index + 1]]
            pending[row] = False
        if not pending.any():
            break
    return pending


@torch.no_grad()
def build_feature_cache(
    model: DualHeadModel,
    sequences: Sequence[Sequence[int]],
    root: str | os.PathLike,
    max_batch_tokens: int = 4096,
    progress: bool = True,
    layer: int | None = None,
    compute_dtype: str = "float32",
) -> FeatureCache:
    """Run the frozen backbone once over ``sequences`` and cache its final hidden states under ``root``.

    With ``layer`` the cache holds the input of block ``layer`` instead (the residual stream after the
    first ``layer`` blocks, before any final norm), for training adapters on the blocks above it.
    ``compute_dtype="bfloat16"`` runs the backbone's matmuls in bf16 (``torch.autocast``; norms and softmax stay
    fp32): several times faster on CPUs with bf16 instructions, and part of the cache's key, so fp32 and bf16
    states never mix. Reuses a complete cache with the same key; resumes an interrupted build.
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("sequences must be a non-empty list of non-empty token id lists")
    blocks = model.backbone.config.num_hidden_layers
    if layer is not None and (not is_int(layer, 0) or layer >= blocks):
        raise ValueError(f"layer must be an integer in [0, {blocks}) for a {blocks}-block backbone, got {layer!r}")
    extra = {} if layer is None else {"layer": layer}
    compute_dtype = effective_compute_dtype(model, compute_dtype)
    if compute_dtype != "float32":  # fp32 caches keep the key they had before the precision was a choice
        extra["compute_dtype"] = compute_dtype
    extra = extra or None
    header = cache_header(model, extra)
    directory = Path(root) / sequences_key(model, sequences, extra)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Two processes asking for the same cache (two evaluations of the same pairs) build it once, one after the other.
    with file_lock(directory.with_name(directory.name + ".lock")):
        return _build(model, sequences, Path(root), directory, header, max_batch_tokens, progress, layer, compute_dtype)


def _build(
    model, sequences, root: Path, directory: Path, header: dict, max_batch_tokens: int, progress: bool, layer: int | None, compute_dtype: str
) -> FeatureCache:
    meta_path = directory / "meta.json"
    meta = _read_json(meta_path)
    if meta and meta.get("complete"):
        return FeatureCache.open(directory)

    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])  # (S + 1,)
    total, width = int(offsets[-1]), model.config.hidden_size
    directory.mkdir(parents=True, exist_ok=True)
    if meta is None:
        np.save(directory / "offsets.npy", offsets)
        tokens = np.lib.format.open_memmap(directory / "tokens.npy", mode="w+", dtype=np.int32, shape=(total,))
        tokens[:] = np.concatenate([np.asarray(s, dtype=np.int32) for s in sequences])
        tokens.flush()
        hidden_store = np.lib.format.open_memmap(directory / "hidden.npy", mode="w+", dtype=np.float16, shape=(total, width))
        pending = _copy_from_donors(root, directory, header, sequence_digests(sequences), offsets, hidden_store)
        hidden_store.flush()
        np.save(directory / "pending.npy", np.flatnonzero(pending))
        meta = {
            "complete": False, "done_batches": 0, "sequences": len(sequences), "tokens": total, "hidden_size": width,
            "header": header, "reused_sequences": int((~pending).sum()),
        }
        _write_json(meta_path, meta)
    hidden_store = np.lib.format.open_memmap(directory / "hidden.npy", mode="r+")
    pending_path = directory / "pending.npy"
    batches = _batches(lengths, max_batch_tokens, np.load(pending_path, allow_pickle=False) if pending_path.is_file() else None)
    pad_id = model.tokenizer.pad_token_id or 0
    model.eval()
    bar = tqdm(total=len(batches), initial=meta["done_batches"], desc="caching backbone features", disable=not progress)
    clock = time.time()
    for batch_index in range(meta["done_batches"], len(batches)):
        rows = batches[batch_index]
        longest = int(lengths[rows].max())
        input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding, like generation
            input_ids[i, longest - lengths[row] :] = torch.as_tensor(sequences[row], dtype=torch.long)
            attention_mask[i, longest - lengths[row] :] = 1
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=compute_dtype == "bfloat16"):
            if layer is None:
                hidden = model.backbone_hidden(input_ids.to(model.device), attention_mask.to(model.device))  # (b, L, d)
            else:
                hidden = block_input(model.backbone, input_ids.to(model.device), attention_mask.to(model.device), layer)  # (b, L, d)
        hidden = hidden.float().cpu().numpy().astype(np.float16)
        for i, row in enumerate(rows):
            hidden_store[offsets[row] : offsets[row + 1]] = hidden[i, longest - lengths[row] :]
        hidden_store.flush()
        meta["done_batches"] = batch_index + 1
        meta["seconds"] = round(meta.get("seconds", 0.0) + time.time() - clock, 2)  # summed over resumed builds
        clock = time.time()
        _write_json(meta_path, meta)
        bar.update(1)
    bar.close()
    meta["complete"] = True
    _write_json(meta_path, meta)
    return FeatureCache.open(directory)
