"""Train the preference-aware reward head and context gate on cached backbone features (PARM + Dual-Head).

Each step draws a preference ``w ~ Dirichlet(1)`` and a batch of pairs from every objective, and minimises

    L = L_LM(fused logits on chosen replies) + lambda_R · sum_i w_i · L_pref(D_i) − lambda_G · E_t[H(alpha_t)]

with every head conditioned on ``w``. The backbone is frozen, so its hidden states are computed once and
cached on disk (:mod:`paretoalign.features`); steps never run it. Sampling is a pure function of
``(seed, step)``, so a run resumed from its last checkpoint ends exactly where an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from .backbone import load_backbone
from .batches import (
    PairBatch,
    PairIndex,
    PreparedData,
    add_onpolicy_sequences,
    join_pair_batches,
    sequence_prompt_lengths,
    step_pair_ids,
    step_preference,
)
from .candidates import build_candidate_cache
from .data import PKU_SOURCE
from .features import build_feature_cache, check_compute_dtype, feature_cache_root
from .files import atomic_write, is_int, read_json_object, read_results, read_safetensors, record_run_config, write_json
from .loop import LOG_NAME, Recipe, RunSettings, run_loop
from .losses import arm_preference_loss, gate_entropy_loss, gate_logit_penalty, multi_objective_loss
from .model import DualHeadConfig, DualHeadModel
from .objective import score_pairs
from .teachers import fit_teachers, label_onpolicy, pair_features, relabel_with_teachers

logger = logging.getLogger(__name__)
PREFERENCE_SAMPLINGS = ("step", "objective")
DEFAULT_TRAIN_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.json"


GATE_OBJECTIVES = ("lm", "preference", "both")
RULE_KEYS = ("objectives", "sources", "prefer", "over")  # every onpolicy_rules entry has these
RULE_OPTIONS = {"refuses": ("prefer", "over")}  # and may have these, with one of those values


@dataclass
class TrainConfig(RunSettings):
    """Everything a training run needs; saved as ``train_config.json`` beside its checkpoints."""

    output_dir: str = field(default="runs/default", metadata={"help": "where checkpoints, logs and the model go"})
    model: dict = field(default_factory=dict, metadata={"help": "DualHeadConfig fields (reward_head, gate_heads, ...)"})
    max_train_pairs_by_objective: dict = field(
        default_factory=dict,
        metadata={"help": 'an objective\'s own max_train_pairs, e.g. {"helpfulness": 1500} (the others keep max_train_pairs)'},
    )
    written_pair_share: dict = field(
        default_factory=dict,
        metadata={
            "help": 'the share of an objective\'s pairs in each step drawn from its human-written pairs, e.g. {"harmlessness": '
            "0.5}, the rest from pairs of the backbone's own replies (onpolicy); unset: every training pair of the "
            "objective equally likely, so the written pairs' share is their share of the pool"
        },
    )
    reward_learning_rate: float | None = field(
        default=None,
        metadata={"help": "peak learning rate of the reward head and branch (default: learning_rate; the gate keeps learning_rate)"},
    )
    adam_betas: tuple[float, float] = field(default=(0.9, 0.999))
    lambda_r: float = field(default=1.0, metadata={"help": "weight of the preference losses"})
    lambda_g: float = field(default=0.01, metadata={"help": "weight of the gate entropy regulariser"})
    lambda_z: float = field(
        default=0.0,
        metadata={
            "help": "weight of a penalty on the gate's squared pre-sigmoid values (a z-loss): keeps the gate out of "
            "saturation, where a gate carried to alpha = 0 gets no gradient back (0: off)"
        },
    )
    lm_loss_replies: str = field(
        default="all",
        metadata={
            "help": "the chosen replies whose LM loss trains the gate: all, or written (human-written ones only, not the "
            "backbone's own on-policy samples, whose likelihood the frozen LM already maximises, so on them the loss "
            "only teaches the gate to close)"
        },
    )
    gate_objective: str = field(
        default="lm",
        metadata={
            "help": "what trains the gate: lm (the LM loss on the fused log-probs of chosen replies), preference (a "
            "Bradley-Terry loss on the fused model's gain over the frozen LM, chosen minus rejected, per objective at "
            "its preference: the gate opens where the reward head separates the pair), or both"
        },
    )
    lm_loss_trains_reward_head: bool = field(
        default=False,
        metadata={
            "help": "let the LM loss on the fused logits train the reward head too (the Dual-Head paper); off, it trains "
            "the gate only and the reward head learns from preferences alone, so its log-probs stay a reward"
        },
    )
    teacher_objectives: list[str] = field(
        default_factory=list,
        metadata={
            "help": "objectives whose teacher (a Bradley-Terry probe on pooled cached states, trained on that objective's "
            "training pairs) labels the other objectives' training pairs, which then train this objective too "
            "(paretoalign.teachers); []: human labels only"
        },
    )
    train_sources: dict = field(
        default_factory=dict,
        metadata={
            "help": 'train an objective on some data sources only, e.g. {"harmlessness": ["pku-saferlhf"]}; the pairs of '
            "the other sources are still drawn, cached and validated on, so runs that differ here share one feature cache"
        },
    )
    onpolicy: list[str] = field(
        default_factory=list,
        metadata={
            "help": "folders of the backbone's own sampled replies (paretoalign sample-replies); every pair of two replies "
            "to a prompt gets a label from each objective's teacher where it is confident, and trains that objective"
        },
    )
    onpolicy_sources: dict = field(
        default_factory=dict,
        metadata={
            "help": 'restrict an objective\'s on-policy labels to prompts of some sources, e.g. {"harmlessness": '
            '["harmless-base", "pku-saferlhf"]} (a harmlessness teacher prefers a refusal even to a harmless question); '
            "an objective not named labels every prompt"
        },
    )
    onpolicy_teachers: dict = field(
        default_factory=dict,
        metadata={
            "help": 'let another objective\'s teacher label an objective\'s on-policy pairs of some prompt sources, e.g. '
            '{"harmlessness": {"helpful-base": "helpfulness"}}: on benign prompts both replies are harmless, and the '
            "helpfulness label says that declining is not the harmless choice; default: each objective's own teacher"
        },
    )
    onpolicy_rules: list = field(
        default_factory=list,
        metadata={
            "help": 'labels by construction for on-policy pairs between two folders, e.g. [{"objectives": ["helpfulness", '
            '"harmlessness"], "sources": ["helpful-base"], "prefer": "data/onpolicy/benign", "over": '
            '"data/onpolicy/benign-declines"}]: on benign prompts a free reply beats one sampled from a declining opening; '
            "they replace the teachers' labels of those pairs; an optional \"refuses\": \"prefer\" (or \"over\") keeps only "
            "the pairs where the keyword refusal detector says that reply declines and the other does not"
        },
    )
    teacher_accuracy: float = field(
        default=0.75, metadata={"help": "keep teacher labels above the margin at which the teacher reaches this validation accuracy"}
    )
    preference_sampling: str = field(
        default="step",
        metadata={
            "help": f"one of {PREFERENCE_SAMPLINGS}: 'step' draws one w ~ Dirichlet per step for every pair and weighs the "
            "objectives' losses by it (PARM); 'objective' scores each objective's pairs at its own one-hot preference, so "
            "each one-hot learns from its own labels only and nothing averages one objective's labels into the other's "
            "(interior preferences interpolate the one-hots: PBLoRA is linear in w)"
        },
    )
    train_objective: str | None = field(
        default=None,
        metadata={
            "help": "train a reward model for this objective only (GenARM: one per objective, mixed by w at decoding): "
            "every step at its one-hot preference, the other objectives' losses weighted 0; needs preference_sampling "
            "'step' (default None: every objective)"
        },
    )
    feature_dtype: str = field(
        default="float32",
        metadata={
            "help": "precision of the backbone's matmuls while caching features: float32 or bfloat16 (several times "
            "faster on CPUs with bf16 instructions; a separate cache)"
        },
    )
    tail_samples: int = field(
        default=0,
        metadata={
            "help": "with candidate_tokens: tokens drawn per position from the LM's distribution over the other tokens, "
            "so the heads pay for raising them too (an importance-sampled renormalisation); 0: the other tokens keep "
            "the LM's logits"
        },
    )
    candidate_tokens: int | None = field(
        default=None,
        metadata={
            "help": "train on each response position's label and the frozen LM's C - 1 likeliest other tokens, cached once, "
            "instead of the whole vocabulary (exact for logits the heads leave unchanged; see paretoalign.candidates); "
            "null: the whole vocabulary. Validation at the end of a run always uses the whole vocabulary"
        },
    )
    block_cache_layer: int | None = field(
        default=None,
        metadata={
            "help": "with model.reward_layers = k: cache the input of this block (default N - k); a lower block lets runs "
            "with different k share one cache (the frozen blocks in between run every step)"
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.adam_betas = tuple(self.adam_betas)
        check_compute_dtype(self.feature_dtype)
        if self.lm_loss_replies not in ("all", "written"):
            raise ValueError(f"lm_loss_replies must be 'all' or 'written', got {self.lm_loss_replies!r}")
        if self.gate_objective not in GATE_OBJECTIVES:
            raise ValueError(f"gate_objective must be one of {GATE_OBJECTIVES}, got {self.gate_objective!r}")
        if self.block_cache_layer is not None and not is_int(self.block_cache_layer, 0):
            raise ValueError(f"block_cache_layer must be an integer >= 0 or null, got {self.block_cache_layer!r}")
        if self.reward_learning_rate is not None and not self.reward_learning_rate > 0:
            raise ValueError(f"reward_learning_rate must be > 0 or null, got {self.reward_learning_rate!r}")
        self.teacher_objectives = list(self.teacher_objectives)
        if not isinstance(self.train_sources, dict) or any(
            name not in self.objectives or not isinstance(sources, list) or not sources for name, sources in self.train_sources.items()
        ):
            raise ValueError(f"train_sources must map objectives {self.objectives} to non-empty lists of sources, got {self.train_sources!r}")
        self.onpolicy = [str(path) for path in self.onpolicy]
        if not isinstance(self.onpolicy_sources, dict) or any(
            name not in self.objectives or not isinstance(sources, list) for name, sources in self.onpolicy_sources.items()
        ):
            raise ValueError(f"onpolicy_sources must map objectives {self.objectives} to lists of sources, got {self.onpolicy_sources!r}")
        if not isinstance(self.onpolicy_teachers, dict) or any(
            name not in self.objectives or not isinstance(by_source, dict) or any(t not in self.objectives for t in by_source.values())
            for name, by_source in self.onpolicy_teachers.items()
        ):
            raise ValueError(
                f"onpolicy_teachers must map objectives {self.objectives} to {{source: teacher objective}}, got {self.onpolicy_teachers!r}"
            )
        for number, rule in enumerate(self.onpolicy_rules, start=1):
            problem = None
            if not isinstance(rule, dict) or not set(RULE_KEYS) <= set(rule) <= {*RULE_KEYS, *RULE_OPTIONS}:
                keys = sorted(rule) if isinstance(rule, dict) else None
                problem = f"must have the keys {', '.join(RULE_KEYS)} and may have {', '.join(RULE_OPTIONS)}, got keys {keys}"
            elif any(key in rule and rule[key] not in values for key, values in RULE_OPTIONS.items()):
                problem = " and ".join(f"{key} must be {' or '.join(map(repr, values))}" for key, values in RULE_OPTIONS.items())
            elif not isinstance(rule["objectives"], list) or not rule["objectives"] or any(n not in self.objectives for n in rule["objectives"]):
                problem = f"objectives must be a non-empty list of {self.objectives}"
            elif not isinstance(rule["sources"], list) or not rule["sources"]:
                problem = "sources must be a non-empty list of prompt sources"
            elif any(not isinstance(s, str) for s in rule["sources"]):
                problem = "sources must be prompt source names (strings)"
            elif any(not isinstance(rule[key], str) or Path(rule[key]) not in {Path(f) for f in self.onpolicy} for key in ("prefer", "over")):
                problem = f"prefer and over must be folders of onpolicy {self.onpolicy}"
            elif Path(rule["prefer"]) == Path(rule["over"]):
                problem = "prefer and over must be two different folders"
            if problem:
                raise ValueError(f"onpolicy_rules[{number}] {problem}, got {rule!r}")
        unknown = [name for name in self.teacher_objectives if name not in self.objectives]
        if unknown:
            raise ValueError(f"teacher_objectives must be among objectives {self.objectives}, got {unknown}")
        if not 0.5 <= self.teacher_accuracy <= 1:
            raise ValueError(f"teacher_accuracy must be in [0.5, 1], got {self.teacher_accuracy!r}")
        if self.preference_sampling not in PREFERENCE_SAMPLINGS:
            raise ValueError(f"preference_sampling must be one of {PREFERENCE_SAMPLINGS}, got {self.preference_sampling!r}")
        if self.train_objective is not None:
            if self.train_objective not in self.objectives:
                raise ValueError(f"train_objective must be one of objectives {self.objectives}, got {self.train_objective!r}")
            if self.preference_sampling != "step":
                raise ValueError(
                    f"train_objective {self.train_objective!r} trains at its one-hot preference: it needs preference_sampling "
                    f"'step', got {self.preference_sampling!r}"
                )
        for name in ("lambda_r", "lambda_g", "lambda_z"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.candidate_tokens is not None and not is_int(self.candidate_tokens, 2):
            raise ValueError(f"candidate_tokens must be an integer >= 2 (the label and one other token) or null, got {self.candidate_tokens!r}")
        if not is_int(self.tail_samples, 0):
            raise ValueError(f"tail_samples must be an integer >= 0, got {self.tail_samples!r}")
        for objective, limit in self.max_train_pairs_by_objective.items():
            if objective not in self.objectives:
                raise ValueError(f"max_train_pairs_by_objective names {objective!r}, not one of the objectives {list(self.objectives)}")
            if limit is not None and not is_int(limit, 1):
                raise ValueError(f"max_train_pairs_by_objective[{objective!r}] must be a positive integer or null, got {limit!r}")
        for objective, share in self.written_pair_share.items():
            if objective not in self.objectives:
                raise ValueError(f"written_pair_share names {objective!r}, not one of the objectives {list(self.objectives)}")
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
                raise ValueError(f"written_pair_share[{objective!r}] must be a number in [0, 1], got {share!r}")
            if round(share * self.batch_pairs) in (0, self.batch_pairs) and 0 < share < 1:
                raise ValueError(
                    f"written_pair_share[{objective!r}] {share!r} rounds to {round(share * self.batch_pairs)} of batch_pairs "
                    f"{self.batch_pairs}: use 0, 1 or a share that leaves both kinds of pair in a step"
                )
            if not self.onpolicy and share < 1:
                raise ValueError(f"written_pair_share[{objective!r}] {share!r} leaves room for on-policy pairs, but onpolicy is empty")
        heads = self.model_config()  # validate the head settings now, not after caching features
        if self.candidate_tokens is not None and heads.reward_head == "full_rank":
            raise ValueError(
                "candidate_tokens needs a reward head whose change to a logit can be read out alone (reward_head "
                f"not 'full_rank'), got reward_head={heads.reward_head!r}"
            )

    def train_limit(self, objective: str) -> int | None:
        return self.max_train_pairs_by_objective.get(objective, self.max_train_pairs)

    def model_config(self) -> DualHeadConfig:
        overrides = dict(self.model)
        for reserved in ("backbone", "objectives"):
            if reserved in overrides:
                raise ValueError(f"set {reserved!r} at the top level of the train config, not inside 'model'")
        return DualHeadConfig(backbone=self.backbone, objectives=list(self.objectives), **overrides)

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides) -> "TrainConfig":
        """Read a JSON config; ``"extends": "other.json"`` (relative to the file) supplies defaults first."""
        data = _read_config_chain(Path(path))
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "model" in overrides:  # model settings merge into the file's, like an ``extends`` chain
            overrides["model"] = {**data.get("model", {}), **overrides["model"]}
        data.update(overrides)
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown train config fields {unknown} in {str(path)!r}")
        return cls(**data)


def _read_config_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"train config {str(path)!r} does not exist")
    if path.resolve() in seen:
        raise ValueError(f"train config {str(path)!r} extends itself")
    data = read_json_object(path, "train config")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    merged = _read_config_chain(path.parent / parent, (*seen, path.resolve()))
    model = {**merged.get("model", {}), **data.pop("model", {})}
    return {**merged, **data, "model": model}


# ---------------------------------------------------------------------------------------------- data


def prepare_data(config: TrainConfig, model: DualHeadModel, progress: bool = True) -> PreparedData:
    """Split the pairs by prompt, tokenize train and validation pairs, and cache their backbone features."""
    drawn = config.pair_sequences(model.tokenizer)
    collator, sequences, indices = drawn.collator, drawn.sequences, drawn.index
    kept: dict[str, np.ndarray] = {}  # train_sources: which drawn training pairs train (all of them are cached)
    for objective in config.objectives:
        allowed = config.train_sources.get(objective)
        if not allowed:
            continue
        chosen_pairs = drawn.pairs["train"][objective]
        kept[objective] = np.array([pair.source in allowed for pair in chosen_pairs], dtype=bool)
        if not kept[objective].any():
            raise ValueError(f"train_sources[{objective!r}] = {allowed} keeps none of its {len(chosen_pairs)} training pairs")
    first_sampled = len(sequences)  # every human-written pair's sequences come before the sampled replies
    excluded = () if config.include_pku else (PKU_SOURCE,)  # PKU's prompts come with its license, sampled replies too
    groups = add_onpolicy_sequences(collator, config.onpolicy, sequences, excluded)
    root = feature_cache_root(config.feature_cache)
    cache = build_feature_cache(model, sequences, root, config.max_batch_tokens, progress, compute_dtype=config.feature_dtype)
    block_cache, block_layer = None, None
    if model.reward_branch is not None:
        block_layer = model.branch_layer if config.block_cache_layer is None else config.block_cache_layer
        if block_layer > model.branch_layer:
            raise ValueError(
                f"block_cache_layer must be at most {model.branch_layer} (N - reward_layers), got {config.block_cache_layer!r}"
            )
        block_cache = build_feature_cache(
            model, sequences, root, config.max_batch_tokens, progress, layer=block_layer, compute_dtype=config.feature_dtype
        )
    candidates = None
    if config.candidate_tokens is not None:
        prompt_lengths = sequence_prompt_lengths([i for split in indices.values() for i in split.values()], len(sequences))
        for group in groups:
            prompt_lengths[group.rows] = group.prompt_length
        lm_head = model.backbone.get_output_embeddings()
        candidates = build_candidate_cache(
            lm_head, cache, prompt_lengths, config.candidate_tokens, config.tail_samples, config.seed, progress
        )
    train_index, report, conflicts, onpolicy_scores, teachers = dict(indices["train"]), None, None, None, None
    for objective, keep in kept.items():
        train_index[objective] = train_index[objective].select(keep)
    if config.teacher_objectives or groups:
        names = config.objectives if groups else config.teacher_objectives
        features, val_features = pair_features(cache, train_index), pair_features(cache, indices["validation"])
        teachers, report = fit_teachers(features, val_features, names, config.teacher_accuracy)
        train_index, conflicts = relabel_with_teachers(
            train_index, indices["validation"], features, val_features, teachers, report, config.teacher_objectives
        )
        if groups:
            labelled, rewards, report["onpolicy"] = label_onpolicy(
                cache, teachers, groups, config.onpolicy_sources, config.onpolicy_teachers, config.onpolicy_rules
            )
            train_index = {name: PairIndex.concat([index, labelled[name]]) for name, index in train_index.items()}
            onpolicy_scores, start = [], 0
            for group in groups:
                span = slice(start, start + len(group.rows))
                start += len(group.rows)
                scores = {name: [round(float(r), 4) for r in values[span]] for name, values in rewards.items()}
                onpolicy_scores.append(
                    {"folders": group.folders, "prompt_id": group.prompt_id, "source": group.source, "teacher_rewards": scores}
                )
    return PreparedData(
        cache, train_index, indices["validation"], block_cache, block_layer, candidates, report, conflicts, onpolicy_scores, first_sampled,
        teachers,
    )


# ---------------------------------------------------------------------------------------------- steps


def row_preferences(batches: list[PairBatch], preference: torch.Tensor, sampling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The preference of every row of the joined batches ``(rows, k)`` and the objectives' loss weights ``(k,)``.

    ``step``: every row at the step's ``preference``, losses weighted by it. ``objective``: objective ``i``'s rows at
    the one-hot ``e_i``, losses averaged.
    """
    k = preference.shape[-1]
    if sampling == "step":
        rows = sum(2 * batch.num_pairs for batch in batches)
        return preference.expand(rows, -1), preference
    one_hots = torch.eye(k, dtype=preference.dtype)  # (k, k)
    rows = torch.cat([one_hots[i].expand(2 * batch.num_pairs, -1) for i, batch in enumerate(batches)])  # (rows, k)
    return rows, torch.full((k,), 1.0 / k, dtype=preference.dtype)


def training_loss(model: DualHeadModel, batches: list[PairBatch], preference: torch.Tensor, config: TrainConfig):
    """The total loss for one step and its parts: one heads pass over every objective's pairs."""
    joined = join_pair_batches(batches)
    rows = joined.input_ids.shape[0]
    row_preference, weights = row_preferences(batches, preference, config.preference_sampling)
    scores = score_pairs(
        model, joined, row_preference.to(joined.hidden.device), reward_grad_from_fusion=config.lm_loss_trains_reward_head
    )  # rows: [c_1, r_1, c_2, r_2, ...]
    pref_losses, gate_losses, stats, start = [], [], {}, 0
    gains = scores.fusion_gains(model.config.reward_reduction) if config.gate_objective != "lm" else None  # (rows,)
    chosen_rows = torch.zeros(rows, dtype=torch.bool, device=joined.hidden.device)  # (rows,)
    for name, batch in zip(config.objectives, batches):
        size = batch.num_pairs
        chosen = scores.rewards[start : start + size]  # (B,)
        rejected = scores.rewards[start + size : start + 2 * size]  # (B,)
        loss, objective_stats = arm_preference_loss(chosen, rejected, config.beta_r)
        pref_losses.append(loss)
        stats.update({f"{name}/{key}": value.item() for key, value in objective_stats.items()})
        stats[f"{name}/pref_loss"] = loss.item()
        if gains is not None:  # the gate's preference loss on the fused model's implicit reward margin
            gate_loss, gate_stats = arm_preference_loss(gains[start : start + size], gains[start + size : start + 2 * size], config.beta_r)
            gate_losses.append(gate_loss)
            stats[f"{name}/gate_pref_loss"] = gate_loss.item()
            stats[f"{name}/gate_accuracy"] = gate_stats["rewards/accuracies"].item()
        chosen_rows[start : start + size] = True
        start += 2 * size
    if config.lm_loss_replies == "written":
        if joined.sampled is None:
            raise ValueError("lm_loss_replies 'written' needs batches that say which replies were sampled (PairBatch.sampled)")
        chosen_rows &= ~joined.sampled.to(chosen_rows.device)
    chosen_tokens = chosen_rows[scores.rows]  # (N,) response tokens of chosen replies
    if config.gate_objective == "preference":
        lm = scores.fused_logprobs.sum() * 0.0  # reported below as 0: the LM loss does not train the gate
    elif chosen_tokens.any():
        lm = -scores.fused_logprobs[chosen_tokens].mean()
    else:  # no written chosen reply in this step's batch: no LM loss, and no gradient to the gate from it
        lm = scores.fused_logprobs.sum() * 0.0
    gate = gate_entropy_loss(scores.gate, scores.mask, config.lambda_g)
    learned_gate = model.config.fixed_gate is None  # a constant alpha has no logits to keep in range
    if config.lambda_z and learned_gate:
        gate = gate + gate_logit_penalty(scores.gate_logits, scores.mask, config.lambda_z)
    if gate_losses:
        gate = gate + (torch.stack(gate_losses) * weights.to(lm.device)).sum()
    total = multi_objective_loss(lm, torch.stack(pref_losses), weights.to(lm.device), gate, config.lambda_r)
    stats.update({"loss": total.item(), "lm_loss": lm.item(), "gate_loss": gate.item(), "gate_mean": scores.gate[scores.mask].mean().item()})
    if learned_gate:
        stats["gate_logit_rms"] = scores.gate_logits[scores.mask].detach().square().mean().sqrt().item()
    return total, stats


@torch.no_grad()
def evaluate(
    model: DualHeadModel, data: PreparedData, config: TrainConfig, preferences=None, batch_pairs: int = 16, exact: bool = True
) -> dict:
    """Validation ARM accuracy per objective at each preference (default: one-hot and uniform).

    ``exact`` reads the reward head out over the whole vocabulary (what decoding and ``arm-accuracy`` see); otherwise
    at the cached candidate tokens, as training does (much faster; exact only for a head that leaves the rest alone).
    """
    k = len(config.objectives)
    preferences = preferences or [tuple(float(i == j) for j in range(k)) for i in range(k)] + [tuple([1.0 / k] * k)]
    model.eval()
    results = {}
    for objective, index in data.validation.items():
        margins = _reward_margins(model, data, index, preferences, batch_pairs, exact)
        for preference, margin in zip(preferences, margins):
            label = ",".join(f"{w:g}" for w in preference)
            results[f"val/{objective}/accuracy@{label}"] = int((margin > 0).sum()) / max(len(index.chosen), 1)
    # Conflict pairs: does each one-hot side with its own objective's label where the two objectives disagree?
    for (objective, teacher), index in (data.conflicts or {}).items():
        if not len(index.chosen):
            continue
        own, other = (tuple(float(name == target) for name in config.objectives) for target in (objective, teacher))
        at_own, at_other = _reward_margins(model, data, index, [own, other], batch_pairs, exact)
        for preference, target, agree in ((own, objective, at_own > 0), (other, teacher, at_other < 0)):
            label = ",".join(f"{w:g}" for w in preference)
            results[f"val/conflict/{objective}-vs-{teacher}/agrees-with-{target}@{label}"] = int(agree.sum()) / len(index.chosen)
        results[f"val/conflict/{objective}-vs-{teacher}/pairs"] = len(index.chosen)
    model.train()
    return results


def _reward_margins(model: DualHeadModel, data: PreparedData, index: PairIndex, preferences, batch_pairs: int, exact: bool) -> list[np.ndarray]:
    """Per preference, ``(P,)`` the reward head's R(chosen) - R(rejected) for the pairs of ``index``."""
    found = [[] for _ in preferences]
    for start in range(0, len(index.chosen), batch_pairs):
        ids = np.arange(start, min(start + batch_pairs, len(index.chosen)))
        batch = data.collate(index, ids, candidates=not exact).to(model.device)
        for slot, preference in enumerate(preferences):
            rows = torch.tensor(preference, device=model.device).expand(batch.input_ids.shape[0], -1)
            chosen, rejected = score_pairs(model, batch, rows, fused=False, exact=exact).chosen_and_rejected()
            found[slot].append((chosen - rejected).float().cpu().numpy())
    return [np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32) for parts in found]


# ---------------------------------------------------------------------------------------------- checkpoints


def parameter_groups(model: DualHeadModel, config: TrainConfig) -> list[dict]:
    """AdamW groups: the reward head and branch at ``reward_learning_rate`` (when set), everything else at ``learning_rate``."""
    reward_lr = config.reward_learning_rate or config.learning_rate
    reward, other = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (reward if name.startswith(("reward_head.", "reward_branch.")) else other).append(parameter)
    groups = [{"params": reward, "lr": reward_lr}, {"params": other, "lr": config.learning_rate}]
    return [group for group in groups if group["params"]]


def machine_description(device: torch.device) -> str:
    """What the run ran on, for the model card."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads (torch {torch.__version__})"


# ---------------------------------------------------------------------------------------------- the run


def train(config: TrainConfig, model: DualHeadModel | None = None, progress: bool = True) -> DualHeadModel:
    """Train (or resume) a run in ``config.output_dir``; the final model is saved to ``output_dir/model``.

    Runs under ``accelerate launch`` as well: every process takes its share of each step's pairs and the
    gradients are averaged across processes before the update.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if model is None:
        backbone, tokenizer = load_backbone(config.backbone, device=accelerator.device)
        torch.manual_seed(config.seed)
        model = DualHeadModel(backbone, tokenizer, config.model_config())
    record_run_config(output / "train_config.json", config, write=accelerator.is_main_process)

    prepared_at = time.time()
    with accelerator.main_process_first():
        data = prepare_data(config, model, progress and accelerator.is_main_process)
    feature_seconds = time.time() - prepared_at
    if data.teacher_report is not None and accelerator.is_main_process:
        write_json(output / "teacher_labels.json", data.teacher_report, sort_keys=False)
    if data.onpolicy_scores and accelerator.is_main_process:
        scores_text = "".join(json.dumps(line) + "\n" for line in data.onpolicy_scores)
        atomic_write(output / "onpolicy_scores.jsonl", lambda tmp: Path(tmp).write_text(scores_text))
    rank, world = accelerator.process_index, accelerator.num_processes
    for objective, share in config.written_pair_share.items():  # a pool the share draws from is empty: say so now
        step_pair_ids(data.train[objective], data.first_sampled, config.batch_pairs, 0, config.seed, 0, share, objective)

    def step_loss(step: int) -> tuple[torch.Tensor, dict]:
        if config.train_objective is None:
            preference = step_preference(len(config.objectives), step, config.seed, config.dirichlet_concentration)
        else:  # one objective's reward model: its one-hot, so the other objectives' losses weigh 0
            preference = torch.tensor([float(name == config.train_objective) for name in config.objectives])
        batches = []
        for stream, objective in enumerate(config.objectives):
            share = config.written_pair_share.get(objective)
            index, ids = step_pair_ids(data.train[objective], data.first_sampled, config.batch_pairs, step, config.seed, stream, share, objective)
            batches.append(data.collate(index, ids[rank::world]).to(model.device))
        loss, stats = training_loss(model, batches, preference, config)
        sampled = preference.tolist() if config.preference_sampling == "step" else "one-hot per objective"
        return loss, {"preference": sampled, **stats}

    def evaluate_at(done: int) -> dict:
        exact = config.candidate_tokens is None or done == config.steps  # the last one always over the vocabulary
        return {**evaluate(model, data, config, exact=exact), "val_readout": "vocabulary" if exact else f"candidates-{config.candidate_tokens}"}

    def load_weights(folder: Path) -> None:
        weights = read_safetensors(folder / "dualhead_model.safetensors", str(model.device), "checkpoint weights")
        model.load_trainable_state_dict(weights, str(folder))

    recipe = Recipe(
        step_loss,
        evaluate_at,
        model.save_pretrained,
        load_weights,
        rates=lambda rates: {"lr": rates[-1], "reward_lr": rates[0]},  # [reward head and branch, the rest], or one group
    )
    model.train()
    result = run_loop(
        recipe,
        output,
        parameter_groups(model, config),
        config,
        device=model.device,
        accelerator=accelerator,
        progress=progress,
        description="training heads",
    )
    if accelerator.is_main_process:
        model.save_pretrained(output / "model")
        final_eval = {key: value for key, value in result.final_eval.items() if key != "val_readout"}
        summary = {**result.summary(config.steps, data.cache.directory, feature_seconds, machine_description(accelerator.device)), **final_eval}
        gate = closing_gate_mean(output / LOG_NAME)
        if gate is not None and model.config.fixed_gate is None:
            summary["closing_gate_mean"] = gate
            if gate < CLOSED_GATE:
                logger.warning(
                    "the gate closed: mean alpha %.2g over the last %d steps, so the heads barely change the answers at any "
                    "preference; a penalty on its logits keeps it open (lambda_z, e.g. 0.001)", gate, CLOSING_STEPS,
                )
        write_json(output / "summary.json", summary, sort_keys=False)
    return model.eval()


CLOSING_STEPS = 100  # the steps whose mean gate the summary reports
CLOSED_GATE = 0.01  # below this mean alpha the fused logits are the frozen LM's to within 1 % of the reward head's change


def closing_gate_mean(log_path: Path) -> float | None:
    """The mean of ``gate_mean`` over the last :data:`CLOSING_STEPS` steps of a training log (``None`` without any)."""
    values = [row["gate_mean"] for row in read_results(log_path) if "gate_mean" in row][-CLOSING_STEPS:]
    return sum(values) / len(values) if values else None
