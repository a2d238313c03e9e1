"""Train the offline MiniLM reward scorer: cached frozen embeddings, Bradley–Terry heads selected on validation.

``paretoalign train-scorer`` runs :func:`train_scorer`, which reproduces ``checkpoints/reward-minilm/``:

1. split each objective's vendored pairs by prompt (:func:`paretoalign.data.split_pairs`, seed 0);
2. embed every prompt and reply once with the frozen encoder, cached on disk in chunks so that a rerun
   or an interrupted run does not encode again;
3. for each objective, fit heads of each (hidden size, weight decay) on the TRAIN pairs with the
   Bradley–Terry loss and keep the one with the lowest validation loss;
4. measure pairwise accuracy on the held-out TEST pairs once, and write the checkpoint and its card.
"""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import PKU_SOURCE, SPLIT_NAMES, PreferencePair, load_default_pairs, split_pools
from ..files import atomic_write, is_int, write_json
from ..losses import arm_preference_loss
from .rewards import (
    DEFAULT_FEATURES,
    DEFAULT_SCORER_DIR,
    ENCODER_PACKAGE,
    FEATURE_BLOCKS,
    EmbeddingRewardHead,
    MiniLMRewardScorer,
    MiniLMScorerConfig,
    embedding_size,
    encoder_package_version,
    length_features,
    load_minilm_encoder,
    prompt_text,
    reward_features,
)

CHUNK_SIZE = 512


@dataclass
class ScorerTrainConfig:
    """Hyper-parameters of :func:`train_scorer`; recorded in the checkpoint's ``scorer_config.json``."""

    output_dir: str = field(default=str(DEFAULT_SCORER_DIR), metadata={"help": "checkpoint directory to write", "aliases": ["--out"]})
    seed: int = field(default=0, metadata={"help": "seed of the head initialisation and minibatch order"})
    split_seed: int = field(default=0, metadata={"help": "seed of split_pairs (the shipped splits use 0)"})
    features: list[str] = field(
        default_factory=lambda: list(DEFAULT_FEATURES), metadata={"help": f"feature blocks from {FEATURE_BLOCKS}"}
    )
    prompt_text: str = field(default="last_user", metadata={"help": "what the encoder reads of a prompt"})
    hidden_sizes: list[int] = field(default_factory=lambda: [0, 32], metadata={"help": "head sizes tried (0 = linear)"})
    weight_decays: list[float] = field(default_factory=lambda: [1e-2, 1.0], metadata={"help": "AdamW weight decays tried"})
    dropout: float = field(default=0.5, metadata={"help": "dropout on the head's input (linear) or hidden layer (MLP)"})
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate"})
    epochs: int = field(default=60, metadata={"help": "passes over the training pairs; the best validation epoch is kept"})
    batch_pairs: int = field(default=128, metadata={"help": "pairs per optimiser step"})
    encode_batch_size: int = field(default=32, metadata={"help": "texts per encoder batch"})
    embedding_cache: str | None = field(default=None, metadata={"help": "embedding cache folder (default: the user cache)"})
    device: str = field(default="cpu", metadata={"help": "where the encoder and heads run"})

    def __post_init__(self):
        unknown = [name for name in self.features if name not in FEATURE_BLOCKS]
        if unknown or not self.features:
            raise ValueError(f"features must be a non-empty subset of {FEATURE_BLOCKS}, got {self.features!r}")
        if not self.hidden_sizes or any(not is_int(size, 0) for size in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be non-negative ints, got {self.hidden_sizes!r}")
        if not self.weight_decays or any(not decay >= 0 for decay in self.weight_decays):
            raise ValueError(f"weight_decays must be non-negative, got {self.weight_decays!r}")
        for name in ("epochs", "batch_pairs", "encode_batch_size"):
            value = getattr(self, name)
            if not is_int(value, 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


# ---------------------------------------------------------------------------------------------- embedding cache


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class EmbeddingCache:
    """Sentence embeddings on disk, keyed by a hash of the text, in one folder per encoder.

    It grows in chunk files written atomically (``chunk-00000.npz``: keys and ``(m, d)`` float32
    embeddings, no pickles), so an interrupted run keeps what it had encoded.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._rows: dict[str, np.ndarray] = {}
        self.encoded = 0  # texts this process had to encode (not found on disk)
        self._chunks = 0
        for path in sorted(self.directory.glob("chunk-*.npz")):
            with np.load(path, allow_pickle=False) as chunk:
                for key, embedding in zip(chunk["keys"].tolist(), chunk["embeddings"]):
                    self._rows[key] = embedding
            self._chunks += 1

    def __contains__(self, text: str) -> bool:
        return text_key(text) in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, texts: Sequence[str], embeddings: np.ndarray) -> None:
        keys = [text_key(text) for text in texts]
        embeddings = np.asarray(embeddings, dtype=np.float32)  # (m, d)
        path = self.directory / f"chunk-{self._chunks:05d}.npz"

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, keys=np.asarray(keys), embeddings=embeddings)

        atomic_write(path, write)
        self._chunks += 1
        self._rows.update(zip(keys, embeddings))

    def lookup(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self._rows[text_key(text)] for text in texts])  # (n, d)


def embed_texts(encoder, texts: Sequence[str], cache: EmbeddingCache, batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Embeddings ``(n, d)`` of ``texts``, encoding only those not yet in ``cache`` (longest first, in chunks)."""
    # Longest first, ties by text: the same batches on every run (padding changes the last bits of an embedding).
    missing = sorted({text for text in texts if text not in cache}, key=lambda text: (-len(text), text))
    cache.encoded += len(missing)
    if missing:
        from tqdm.auto import tqdm

        with tqdm(total=len(missing), desc="encoding", unit="text", disable=not progress) as bar:
            for start in range(0, len(missing), CHUNK_SIZE):
                chunk = missing[start : start + CHUNK_SIZE]
                embeddings = encoder.encode(chunk, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
                cache.add(chunk, embeddings)
                bar.update(len(chunk))
    return cache.lookup(texts)


def default_cache_dir() -> Path:
    from ..backbone import cache_dir

    return cache_dir() / "scorer-embeddings"


def encoder_cache_name(max_seq_length: int) -> str:
    return f"{ENCODER_PACKAGE}-{encoder_package_version() or 'unknown'}-len{max_seq_length}"


# ---------------------------------------------------------------------------------------------- heads


def longer_reply_accuracy(pairs: Sequence[PreferencePair]) -> float:
    """The "longer reply wins" baseline: pairwise accuracy of the reply's length in characters."""
    return pairwise_accuracy([len(pair.chosen) for pair in pairs], [len(pair.rejected) for pair in pairs])


def pairwise_accuracy(chosen_rewards, rejected_rewards) -> float:
    """How often the chosen reply scores higher, ties counting one half; ``nan`` for no pairs."""
    chosen, rejected = np.asarray(chosen_rewards, dtype=float), np.asarray(rejected_rewards, dtype=float)
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected rewards must have one shape, got {chosen.shape} and {rejected.shape}")
    if chosen.size == 0:
        return float("nan")
    return float(np.mean((chosen > rejected) + 0.5 * (chosen == rejected)))


@dataclass
class EncodedPairs:
    """Head features of each pair's chosen and rejected reply, ``(n, F)`` each."""

    chosen: torch.Tensor
    rejected: torch.Tensor

    def __len__(self) -> int:
        return len(self.chosen)


def encode_pairs(
    pairs: Sequence[PreferencePair],
    encoder,
    cache: EmbeddingCache,
    features: Sequence[str],
    prompt_kind: str,
    batch_size: int = 32,
    progress: bool = True,
) -> EncodedPairs:
    """Head features of ``pairs`` from cached encoder embeddings (see :func:`paretoalign.scorers.rewards.reward_features`)."""
    prompts = [prompt_text(pair.prompt, prompt_kind) for pair in pairs]
    chosen_texts, rejected_texts = [pair.chosen for pair in pairs], [pair.rejected for pair in pairs]
    embeddings = embed_texts(encoder, prompts + chosen_texts + rejected_texts, cache, batch_size, progress)  # (3n, d)
    prompt_embeddings, chosen_embeddings, rejected_embeddings = (
        torch.from_numpy(part) for part in np.split(embeddings, 3)
    )  # 3 x (n, d)
    chosen = reward_features(prompt_embeddings, chosen_embeddings, torch.from_numpy(length_features(chosen_texts)), features)
    rejected = reward_features(
        prompt_embeddings, rejected_embeddings, torch.from_numpy(length_features(rejected_texts)), features
    )
    return EncodedPairs(chosen, rejected)  # (n, F) each


@torch.no_grad()
def evaluate_head(head: EmbeddingRewardHead, pairs: EncodedPairs) -> dict:
    """``{"loss", "accuracy", "n"}`` of a head on encoded pairs."""
    head.eval()
    chosen, rejected = head(pairs.chosen), head(pairs.rejected)  # (n,) each
    return {
        "loss": float(arm_preference_loss(chosen, rejected)[0]),
        "accuracy": pairwise_accuracy(chosen.numpy(), rejected.numpy()),
        "n": len(pairs),
    }


def fit_head(
    train: EncodedPairs, validation: EncodedPairs, hidden_size: int, weight_decay: float, config: ScorerTrainConfig
) -> tuple[EmbeddingRewardHead, dict]:
    """Fit one head on ``train`` with the Bradley–Terry loss; keep the epoch with the lowest validation loss.

    Returns the head and a record: its settings, best epoch, and train / validation loss and accuracy.
    """
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    head = EmbeddingRewardHead(train.chosen.shape[1], hidden_size, config.dropout)
    head.set_standardization(torch.cat([train.chosen, train.rejected]))  # (2n, F)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=weight_decay)
    best = {"loss": float("inf")}
    best_state, best_epoch = None, 0
    for epoch in range(1, config.epochs + 1):
        head.train()
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), config.batch_pairs):
            batch = order[start : start + config.batch_pairs]
            loss, _ = arm_preference_loss(head(train.chosen[batch]), head(train.rejected[batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scores = evaluate_head(head, validation)
        if scores["loss"] < best["loss"]:
            best, best_epoch = scores, epoch
            best_state = {key: value.clone() for key, value in head.state_dict().items()}
    head.load_state_dict(best_state)
    head.eval()
    fitted = evaluate_head(head, train)
    record = {
        "hidden_size": hidden_size,
        "weight_decay": weight_decay,
        "best_epoch": best_epoch,
        "train_loss": fitted["loss"],
        "train_accuracy": fitted["accuracy"],
        "validation_loss": best["loss"],
        "validation_accuracy": best["accuracy"],
    }
    return head, record


def select_head(
    train: EncodedPairs, validation: EncodedPairs, config: ScorerTrainConfig
) -> tuple[EmbeddingRewardHead, dict, list[dict]]:
    """Fit every (hidden size, weight decay) of ``config`` and keep the lowest validation loss.

    Returns the chosen head, its record, and the records of all candidates.
    """
    candidates = []
    for hidden_size in config.hidden_sizes:
        for weight_decay in config.weight_decays:
            head, record = fit_head(train, validation, hidden_size, weight_decay, config)
            candidates.append((head, record))
    head, record = min(candidates, key=lambda candidate: candidate[1]["validation_loss"])
    return head, record, [record for _, record in candidates]


# ---------------------------------------------------------------------------------------------- the whole run


def hh_splits(data_dir=None, seed: int = 0) -> dict[str, dict[str, list[PreferencePair]]]:
    """The HH-RLHF pairs of every split, ``{objective: {split: pairs}}``: split together with PKU-SafeRLHF (so each
    prompt lands where the Dual-Head's training puts it), then PKU dropped: the shipped scorers know HH-RLHF only
    (MIT data, and a judge independent of the PKU pairs the heads learn from)."""
    splits = split_pools(load_default_pairs(include_pku=True, data_dir=data_dir), seed=seed)
    return {
        objective: {name: [pair for pair in pairs if pair.source != PKU_SOURCE] for name, pairs in by_split.items()}
        for objective, by_split in splits.items()
    }


def train_scorer(config: ScorerTrainConfig | None = None, progress: bool = True, data_dir: str | Path | None = None) -> dict:
    """Train, select on validation, test once, and write a MiniLM scorer checkpoint to ``config.output_dir``.

    Returns the results written to ``test_accuracy.json``: per objective the test and validation
    pairwise accuracy (with ``n``), the chosen head's settings, and every candidate's validation record.
    """
    config = config or ScorerTrainConfig()
    started = time.perf_counter()
    encoder = load_minilm_encoder(config.device)
    max_seq_length = int(encoder.max_seq_length)
    cache = EmbeddingCache(
        Path(config.embedding_cache) if config.embedding_cache else default_cache_dir() / encoder_cache_name(max_seq_length)
    )
    heads, results = {}, {}
    encoded: dict[str, dict[str, EncodedPairs]] = {}
    baselines: dict[str, dict[str, float]] = {}
    for objective, splits in hh_splits(data_dir, config.split_seed).items():
        baselines[objective] = {name: longer_reply_accuracy(splits[name]) for name in ("validation", "test")}
        encoded[objective] = {
            name: encode_pairs(
                splits[name], encoder, cache, config.features, config.prompt_text, config.encode_batch_size, progress
            )
            for name in SPLIT_NAMES
        }
    encode_seconds = time.perf_counter() - started
    for objective, splits in encoded.items():
        head, record, candidates = select_head(splits["train"], splits["validation"], config)
        heads[objective] = head
        results[objective] = {"selected": record, "candidates": candidates, "n_train": len(splits["train"])}
    # The test split is read once, after every choice was made on validation.
    for objective, splits in encoded.items():
        test = evaluate_head(heads[objective], splits["test"])
        results[objective]["test"] = {
            "accuracy": test["accuracy"], "loss": test["loss"], "n": test["n"],
            "longer_reply_accuracy": baselines[objective]["test"],
        }  # fmt: skip
        selected = results[objective]["selected"]
        results[objective]["validation"] = {
            "accuracy": selected["validation_accuracy"],
            "loss": selected["validation_loss"],
            "n": len(splits["validation"]),
            "longer_reply_accuracy": baselines[objective]["validation"],
        }
    seconds = time.perf_counter() - started
    summary = {
        "objectives": list(encoded),
        "results": results,
        "split_seed": config.split_seed,
        "seed": config.seed,
        "wall_seconds": round(seconds, 1),
        "encode_seconds": round(encode_seconds, 1),
        "texts_encoded": cache.encoded,
        "machine": machine_description(),
    }
    scorer_config = MiniLMScorerConfig(
        objectives=list(encoded),
        hidden_sizes={objective: results[objective]["selected"]["hidden_size"] for objective in encoded},
        features=list(config.features),
        prompt_text=config.prompt_text,
        embedding_size=embedding_size(encoder),
        encoder_package_version=encoder_package_version(),
        max_seq_length=max_seq_length,
        training={
            **asdict(config),
            "selection": "lowest validation Bradley-Terry loss over hidden_sizes x weight_decays, and over epochs",
            "selected": {objective: results[objective]["selected"] for objective in encoded},
            "test_accuracy": {objective: results[objective]["test"]["accuracy"] for objective in encoded},
        },
    )
    scorer_config.training.pop("output_dir")
    scorer_config.training.pop("embedding_cache")
    scorer = MiniLMRewardScorer(scorer_config, heads, encoder=encoder, device=config.device)
    write_checkpoint(scorer, summary, config.output_dir)
    return summary


def machine_description() -> dict:
    import os

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def write_checkpoint(scorer: MiniLMRewardScorer, summary: dict, directory: str | Path) -> None:
    """Write the scorer, ``test_accuracy.json`` and a ``README.md`` model card, each file atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scorer.save(directory)
    write_json(directory / "test_accuracy.json", summary)
    card = model_card(scorer.config, summary)
    atomic_write(directory / "README.md", lambda tmp: Path(tmp).write_text(card, encoding="utf-8"))


def model_card(config: MiniLMScorerConfig, summary: dict) -> str:
    """The checkpoint's ``README.md``: data and licenses, training, held-out accuracy."""
    training = config.training
    rows = []
    for objective in config.objectives:
        result = summary["results"][objective]
        selected = result["selected"]
        head = f"MLP, {selected['hidden_size']} hidden" if selected["hidden_size"] else "linear"
        test, validation = result["test"], result["validation"]
        rows.append(
            f"| {objective} | {test['accuracy']:.3f} | {test['n']} | {test['longer_reply_accuracy']:.3f} "
            f"| {validation['accuracy']:.3f} | {validation['n']} | {validation['longer_reply_accuracy']:.3f} | {result['n_train']} "
            f"| {head}, weight decay {selected['weight_decay']:g}, epoch {selected['best_epoch']} |"
        )
    described = {
        "prompt": "the prompt embedding",
        "response": "the reply embedding",
        "product": "the elementwise product of the prompt and reply embeddings",
        "length": "log(1 + characters / words / lines) of the reply",
    }
    features = "; ".join(f"`{name}`: {described[name]}" for name in config.features)
    machine = summary["machine"]
    return f"""# reward-minilm: offline Bradley–Terry reward scorers

The default reward scorer of `paretoalign.scorers.rewards.load_scorer()`: it scores a reply to a
prompt for each objective ({", ".join(config.objectives)}), **higher is better** in every column. Only
differences between replies to the same prompt are meaningful (Bradley–Terry log-odds).

It is a small, offline stand-in for a real reward model, good enough to rank decoding methods
coarsely; online users can pass `hf:helpfulness=...,harmlessness=...` to `load_scorer` for the
Ray2333 GPT-2 reward models instead.

## Model

- Frozen encoder: `{config.encoder}` (Apache-2.0), loaded from the local files of the PyPI package
  `{config.encoder_package}=={config.encoder_package_version}` (MIT); {config.max_seq_length} word pieces per text,
  unit-norm mean-pooled embeddings. The prompt is read as `{config.prompt_text}`.
- Features, standardised with training-set statistics: {features}.
- One head per objective (`scorer.safetensors` holds the heads only; `scorer_config.json` the settings).

## Data

Anthropic HH-RLHF (MIT License, Copyright (c) 2022 Anthropic; see `data/README.md` and
`data/hh-rlhf/LICENSE`): helpfulness from helpful-base, helpful-online and helpful-rejection-sampled,
harmlessness from harmless-base. These are HH-RLHF's own test files, re-split by prompt with
`paretoalign.scorers.training.hh_splits(seed={summary["split_seed"]})` into train / validation / test (split together with PKU-SafeRLHF, near-duplicate prompts kept in one split; PKU-SafeRLHF itself was not used).

## Training

Bradley–Terry loss `-log sigmoid(r(chosen) - r(rejected))` on the **train** split only; AdamW, learning rate
{training["learning_rate"]:g}, {training["batch_pairs"]} pairs a step, up to {training["epochs"]} epochs, dropout {training["dropout"]:g}, seed {training["seed"]}.
For each objective, heads with hidden sizes {training["hidden_sizes"]} (0 = linear) and weight decays {training["weight_decays"]}
were fitted, and the epoch and setting with the lowest **validation** loss kept. The test split was
scored once, after that choice.

Reproduce with `paretoalign train-scorer --out checkpoints/reward-minilm` (embeddings are cached in the
user cache, so a rerun skips encoding).

## Held-out pairwise accuracy

How often the chosen reply scores higher than the rejected one (ties count one half); "longer wins" is
the same for the rule "the longer reply is better", for scale (on harmlessness the shorter reply tends to win).
With n pairs the standard error of an accuracy near 0.6 is about 0.49 / sqrt(n): 0.021 for 545, 0.036 for 183.

| objective | test accuracy | test n | test, longer wins | validation accuracy | validation n | validation, longer wins | train n | selected head |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |
{chr(10).join(rows)}

Wall time {summary["wall_seconds"]:.0f} s, {summary["encode_seconds"]:.0f} s of it loading data and encoding {summary["texts_encoded"]} texts
(a rerun with the embedding cache encodes none), on {machine["cpu_count"]} CPU cores ({machine["processor"]}, torch threads:
{machine["torch_threads"]}, torch {machine["torch"]}).

## Limitations

Trained on ~6k English pairs from one dataset. A frozen sentence embedding carries little of what makes an
HH-RLHF reply more helpful: on helpfulness this scorer is only a few points better than "the longer reply
wins" (linear probes on other MiniLM poolings, joint prompt-reply encodings and hashed bag-of-words features
did no better on validation). Prefer an `hf:` scorer for helpfulness when online. It keys on topic, refusal style and length
more than on correctness, and it has not been checked against adversarial or out-of-domain replies.
"""
