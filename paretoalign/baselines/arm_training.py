"""Train GenARM's and PARM's autoregressive reward models on cached features of the frozen lower blocks.

Only the adapters on the top ``layers`` blocks train, so the input of the first adapted block is computed once for
every sequence and cached on disk (:func:`paretoalign.features.build_feature_cache` with ``layer``); a step runs the
top blocks alone. The loss is GenARM's Bradley–Terry loss on ``R = sum_t log pi_r(y_t | x, y_<t)``:

- GenARM: one ARM per objective, trained on that objective's pairs alone;
- PARM: one ARM, each step under ``w ~ Dirichlet`` with ``sum_i w_i L_pref_i`` over every objective's pairs.

Pairs, splits, batches and preferences come from the same functions as the Dual-Head trainer, so all methods learn
from the same data. Sampling is a pure function of ``(seed, step)``: a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..backbone import load_backbone
from ..batches import (  # the Dual-Head trainer's pairs, batches and preferences: every method learns from the same data
    PairBatch,
    PreparedData,
    batch_pair_ids,
    collate_pairs,
    join_pair_batches,
    step_preference,
)
from ..features import build_feature_cache, feature_cache_root
from ..files import atomic_write, check_positive_ints, read_safetensors, record_run_config
from ..loop import Recipe, RunSettings, run_loop
from ..losses import arm_preference_loss
from ..model import DualHeadConfig, DualHeadModel
from ..train import machine_description
from .arm import (
    ARM_METHODS,
    ARMConfig,
    adapter_parameters,
    bind_preference,
    default_checkpoint,
    new_arm,
    save_arm,
    sequence_rewards,
)

logger = logging.getLogger(__name__)
TRAIN_CONFIG_NAME = "arm_train_config.json"


@dataclass
class ARMTrainConfig(RunSettings):
    """One ARM's training run; saved as ``arm_train_config.json`` in its output directory (the checkpoint)."""

    method: str = field(default="parm", metadata={"help": f"one of {ARM_METHODS}"})
    output_dir: str | None = field(
        default=None, metadata={"help": "the checkpoint directory (default: checkpoints/parm or genarm-<objective>)"}
    )
    objective: str | None = field(default=None, metadata={"help": "genarm: the objective this ARM learns; parm: None"})
    layers: int = field(default=4, metadata={"help": "GenARM and PARM: adapted blocks at the top of the backbone"})
    adapter: dict = field(
        default_factory=dict, metadata={"help": "LoRASettings (genarm) or PBLoRAConfig (parm) fields; empty: defaults"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the adapters' initialisation, batches and preferences"})
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW peak learning rate"})
    dirichlet_concentration: float = field(default=1.0, metadata={"help": "PARM: w ~ Dirichlet(c); 1 is uniform"})
    checkpoint_every: int = field(default=50, metadata={"help": "steps between resumable checkpoints"})

    def __post_init__(self):
        super().__post_init__()
        if self.method not in ARM_METHODS:
            raise ValueError(f"method must be one of {ARM_METHODS}, got {self.method!r}")
        if self.method == "genarm" and self.objective not in self.objectives:
            raise ValueError(
                f"a GenARM run trains one objective's ARM: objective must be one of {self.objectives}, got {self.objective!r}"
            )
        if self.method == "parm" and self.objective is not None:
            raise ValueError(f"a PARM run trains one ARM for every objective; objective must be None, got {self.objective!r}")
        check_positive_ints(self, ("layers",))
        if self.output_dir is None:
            self.output_dir = str(default_checkpoint(self.method, self.objective))

    def arm_config(self, backbone, tokenizer) -> ARMConfig:
        scored = [self.objective] if self.method == "genarm" else self.objectives
        return ARMConfig.for_backbone(
            self.method, scored, backbone, tokenizer, layers=self.layers, adapter=dict(self.adapter) or None, beta_r=self.beta_r
        )


# ---------------------------------------------------------------------------------------------- data


def prepare_arm_data(config: ARMTrainConfig, model: DualHeadModel, first_layer: int, progress: bool = True) -> PreparedData:
    """The Dual-Head trainer's pairs (same split, same subsample), with the input of block ``first_layer`` cached."""
    # Every objective's sequences are cached even for one GenARM objective: the runs of all ARMs share one cache.
    drawn = config.pair_sequences(model.tokenizer)
    root = feature_cache_root(config.feature_cache)
    cache = build_feature_cache(model, drawn.sequences, root, config.max_batch_tokens, progress, layer=first_layer)
    return PreparedData(cache, drawn.index["train"], drawn.index["validation"])


# ---------------------------------------------------------------------------------------------- loss


def arm_training_loss(arm, arm_config: ARMConfig, batches: list[PairBatch], preference: torch.Tensor | None):
    """The step's loss and its parts.

    Args:
        batches: one :class:`~paretoalign.objective.PairBatch` per objective of ``arm_config.objectives``; their
            ``hidden`` is the input of block ``arm_config.first_layer``.
        preference: PARM: the step's ``(k,)`` weights ``w``; GenARM: ``None``.

    Returns:
        ``sum_i w_i L_pref_i`` (PARM) or ``L_pref`` (GenARM), and per-objective stats (trl's names).
    """
    if arm_config.method == "parm":
        bind_preference(arm, preference)
    joined = join_pair_batches(batches)
    rewards = sequence_rewards(arm, joined, arm_config.first_layer)  # rows: [c_1, r_1, c_2, r_2, ...]
    losses, stats, start = [], {}, 0
    for name, batch in zip(arm_config.objectives, batches):
        size = batch.num_pairs
        loss, objective_stats = arm_preference_loss(
            rewards[start : start + size], rewards[start + size : start + 2 * size], arm_config.beta_r
        )
        losses.append(loss)
        stats.update({f"{name}/{key}": value.item() for key, value in objective_stats.items()})
        stats[f"{name}/pref_loss"] = loss.item()
        start += 2 * size
    losses = torch.stack(losses)  # (k,) or (1,)
    total = (preference.to(losses) * losses).sum() if arm_config.method == "parm" else losses.sum()
    stats["loss"] = total.item()
    return total, stats


@torch.no_grad()
def evaluate_arm(arm, arm_config: ARMConfig, data: PreparedData, batch_pairs: int = 16) -> dict:
    """Validation accuracy (R(chosen) > R(rejected)) per objective; PARM's at each one-hot and the uniform preference."""
    k = len(arm_config.objectives)
    preferences = (
        [None] if arm_config.method == "genarm" else [tuple(float(i == j) for j in range(k)) for i in range(k)] + [(1.0 / k,) * k]
    )
    device = arm_device(arm)
    results = {}
    for objective in arm_config.objectives:
        index = data.validation[objective]
        for preference in preferences:
            if preference is not None:
                bind_preference(arm, torch.tensor(preference, device=device))
            correct = 0
            for start in range(0, len(index.chosen), batch_pairs):
                ids = np.arange(start, min(start + batch_pairs, len(index.chosen)))
                rewards = sequence_rewards(arm, collate_pairs(data.cache, index, ids).to(device), arm_config.first_layer)  # (2b,)
                correct += int((rewards[: len(ids)] > rewards[len(ids) :]).sum())
            label = "" if preference is None else "@" + ",".join(f"{w:g}" for w in preference)
            results[f"val/{objective}/accuracy{label}"] = correct / max(len(index.chosen), 1)
    return results


def arm_device(arm) -> torch.device:
    return next(iter(adapter_parameters(arm).values())).device


# ---------------------------------------------------------------------------------------------- checkpoints


# ---------------------------------------------------------------------------------------------- the run


def train_arm(config: ARMTrainConfig, backbone=None, tokenizer=None, progress: bool = True):
    """Train (or resume) one ARM and save it to ``config.output_dir``; returns ``(arm, arm_config)``.

    The directory ends up holding the adapters and ``arm_config.json`` (what decoding loads), ``arm_train_config.json``,
    ``training_log.jsonl`` and ``checkpoint/`` (the resumable state).
    """
    if backbone is None:
        backbone, tokenizer = load_backbone(config.backbone)
    elif tokenizer is None:
        raise ValueError("pass the backbone's tokenizer together with a loaded backbone")
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    record_run_config(output / TRAIN_CONFIG_NAME, config)

    arm_config = config.arm_config(backbone, tokenizer)
    features_model = DualHeadModel(
        backbone, tokenizer, DualHeadConfig(backbone=arm_config.backbone, objectives=config.objectives)
    )
    prepared_at = time.time()
    data = prepare_arm_data(config, features_model, arm_config.first_layer, progress)
    feature_seconds = time.time() - prepared_at
    del features_model
    torch.manual_seed(config.seed)
    arm = new_arm(backbone, arm_config)
    device = arm_device(arm)
    streams = [config.objectives.index(name) for name in arm_config.objectives]  # the Dual-Head trainer's batch streams

    def step_loss(step: int) -> tuple[torch.Tensor, dict]:
        preference = None
        if config.method == "parm":
            preference = step_preference(len(config.objectives), step, config.seed, config.dirichlet_concentration).to(device)
        batches = []
        for stream, objective in zip(streams, arm_config.objectives):
            index = data.train[objective]
            ids = batch_pair_ids(len(index.chosen), config.batch_pairs, step, config.seed, stream)
            batches.append(collate_pairs(data.cache, index, ids).to(device))
        loss, stats = arm_training_loss(arm, arm_config, batches, preference)
        return loss, ({} if preference is None else {"preference": preference.tolist()}) | stats

    def save_weights(folder: Path) -> None:
        adapters = {name: p.detach().to("cpu").contiguous() for name, p in adapter_parameters(arm).items()}
        atomic_write(folder / "adapter.safetensors", lambda tmp: save_file(adapters, tmp))

    def load_weights(folder: Path) -> None:
        adapters = read_safetensors(folder / "adapter.safetensors", str(device), "ARM weights")
        parameters = adapter_parameters(arm)
        if set(adapters) != set(parameters):
            raise ValueError(f"{folder} holds adapters of another ARM layout; use a new output directory")
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(adapters[name])

    recipe = Recipe(step_loss, lambda done: evaluate_arm(arm, arm_config, data), save_weights, load_weights)
    result = run_loop(
        recipe,
        output,
        [{"params": list(adapter_parameters(arm).values())}],
        config,
        device=device,
        progress=progress,
        description=f"training {config.method} ARM",
    )
    arm_config.training = {
        **result.summary(config.steps, data.cache.directory, feature_seconds, machine_description(device)),
        "train_config": TRAIN_CONFIG_NAME,
        **result.final_eval,
    }
    save_arm(arm, arm_config, output)
    return arm, arm_config
