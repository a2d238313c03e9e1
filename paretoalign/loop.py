"""The one resumable training loop every trainer runs (the Dual-Head heads, GenARM's and PARM's ARMs).

A trainer is a recipe on it: what one step's loss is, how to evaluate, and how to save and load its trainable weights.
The loop owns the rest, identically for every trainer: AdamW and a cosine schedule with warm-up, gradient clipping,
the JSON-lines log, resumable checkpoints (weights through the recipe, the optimizer and schedule through
:func:`~paretoalign.files.write_optimizer_state`), validation every ``eval_every`` steps and at the end, and the
progress bar. Every step's batches and preference are a pure function of the step, so a resumed run ends where an
uninterrupted one does; the log keeps the records up to the checkpoint it resumes from.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .backbone import DEFAULT_BACKBONE
from .batches import PairIndex, add_pair_sequences, subsample
from .data import PreferenceCollator, PreferencePair, load_default_pairs, split_pools
from .files import (
    TRAINER_STATE_NAME,
    append_rows,
    atomic_write,
    check_positive_ints,
    is_int,
    latest_checkpoint,
    read_optimizer_state,
    write_checkpoint,
    write_optimizer_state,
)
from .preference import DEFAULT_OBJECTIVES

logger = logging.getLogger(__name__)
LOG_NAME = "training_log.jsonl"
STATE_DIR = "checkpoint"


@dataclass
class PairSequences:
    """What :meth:`RunSettings.pair_sequences` draws: token sequences in cache order, and per split and objective
    where each pair's sequences sit (``index``) and the pairs themselves (``pairs``)."""

    collator: PreferenceCollator
    sequences: list[list[int]] = field(default_factory=list)
    index: dict[str, dict[str, PairIndex]] = field(default_factory=lambda: {"train": {}, "validation": {}})
    pairs: dict[str, dict[str, list[PreferencePair]]] = field(default_factory=lambda: {"train": {}, "validation": {}})


@dataclass
class RunSettings:
    """The settings every trainer on :func:`run_loop` shares, validated here once: which pairs it learns from (data,
    split, subsample, truncation, feature cache) and how the run goes (seed, steps, batch, AdamW, schedule,
    checkpoints, validation). :class:`~paretoalign.train.TrainConfig` and
    :class:`~paretoalign.baselines.arm_training.ARMTrainConfig` extend it, each with its own defaults where they differ.
    """

    output_dir: str | None = field(default=None, metadata={"help": "where checkpoints, logs and the model go"})
    backbone: str = field(default=DEFAULT_BACKBONE, metadata={"help": "backbone id or path"})
    objectives: list[str] = field(
        default_factory=lambda: list(DEFAULT_OBJECTIVES), metadata={"help": "every objective, in preference order"}
    )
    include_pku: bool = field(default=True, metadata={"help": "add PKU-SafeRLHF pairs to harmlessness (CC BY-NC 4.0)"})
    data_dir: str | None = field(default=None, metadata={"help": "preference data folder (default: the vendored data/)"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/validation/test split by prompt"})
    max_train_pairs: int | None = field(default=1500, metadata={"help": "pairs per objective used for training (null in a config: all)"})
    max_eval_pairs: int = field(default=200, metadata={"help": "validation pairs per objective"})
    max_length: int = field(default=320, metadata={"help": "most tokens of prompt + reply"})
    max_prompt_length: int = field(default=192, metadata={"help": "most tokens of the templated prompt"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, batches and preferences"})
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_pairs: int = field(default=8, metadata={"help": "pairs per objective per step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=30, metadata={"help": "steps of linear warm-up before the cosine decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradients clipped to this global norm"})
    beta_r: float = field(default=0.1, metadata={"help": "Bradley-Terry scale on R(chosen) - R(rejected)"})
    dirichlet_concentration: float = field(
        default=1.0, metadata={"help": "w ~ Dirichlet(c) where a step draws its preference; 1 is uniform"}
    )
    checkpoint_every: int = field(default=100, metadata={"help": "steps between resumable checkpoints"})
    eval_every: int = field(default=100, metadata={"help": "steps between validation passes"})
    feature_cache: str | None = field(default=None, metadata={"help": "feature cache folder (default: the user cache)"})
    max_batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per backbone batch while caching"})

    def __post_init__(self):
        self.objectives = list(self.objectives)
        positive = ("steps", "batch_pairs", "max_length", "max_prompt_length", "checkpoint_every", "eval_every", "max_eval_pairs")
        check_positive_ints(self, positive)
        if self.max_train_pairs is not None and not is_int(self.max_train_pairs, 1):
            raise ValueError(f"max_train_pairs must be a positive integer or null, got {self.max_train_pairs!r}")
        for name in ("learning_rate", "beta_r", "dirichlet_concentration", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not is_int(self.warmup_steps, 0):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")

    def train_limit(self, objective: str) -> int | None:
        """How many of ``objective``'s training pairs a run draws (None: all)."""
        return self.max_train_pairs

    def pair_sequences(self, tokenizer) -> PairSequences:
        """The human-written pairs every trainer on these settings learns from, tokenised: the pools split by prompt
        (``split_seed``), each objective's training and validation pairs a seeded subsample (``seed`` plus the
        objective's index; :meth:`train_limit` and ``max_eval_pairs`` pairs), their chosen and rejected sequences in
        order. Two trainers with the same settings draw the same pairs."""
        pools = load_default_pairs(include_pku=self.include_pku, data_dir=self.data_dir)
        missing = [name for name in self.objectives if not pools.get(name)]
        if missing:
            raise ValueError(f"no preference pairs for objectives {missing}; available: {sorted(pools)}")
        collator = PreferenceCollator(tokenizer, self.max_length, self.max_prompt_length)
        drawn = PairSequences(collator)
        pool_splits = split_pools(pools, seed=self.split_seed)
        for objective_index, objective in enumerate(self.objectives):
            for split, limit in (("train", self.train_limit(objective)), ("validation", self.max_eval_pairs)):
                pairs = subsample(pool_splits[objective][split], limit, self.seed + objective_index)
                drawn.index[split][objective] = add_pair_sequences(collator, pairs, drawn.sequences)
                drawn.pairs[split][objective] = pairs
        return drawn

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        """The config a run saved (``to_dict``); a field the class does not have is an error that names it."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}")
        return cls(**data)


@dataclass
class Recipe:
    """What a trainer brings to :func:`run_loop`.

    ``step_loss(step)`` returns the step's loss and the fields it logs (``step`` counts from 0); ``evaluate(done)``
    the validation fields after ``done`` steps; ``save_weights(folder)`` and ``load_weights(folder)`` write and read
    the trainable weights of a checkpoint (safetensors); ``rates(learning_rates)`` names the param groups' current
    learning rates for the log (default: ``{"lr": the last group's}``).
    """

    step_loss: Callable[[int], tuple[torch.Tensor, dict]]
    evaluate: Callable[[int], dict]
    save_weights: Callable[[Path], None]
    load_weights: Callable[[Path], None]
    rates: Callable[[list[float]], dict] | None = None


@dataclass
class LoopResult:
    start: int  # the step the run resumed from (0: a fresh run)
    seconds: float  # wall time of the steps this call ran
    final_eval: dict  # the last validation fields

    def summary(self, steps: int, cache_directory: Path, feature_seconds: float, machine) -> dict:
        """What a trainer records about the run: steps, resume point, training time, the feature cache's build time
        (from its ``meta.json``, else the seconds this run spent preparing data) and the machine."""
        built = json.loads((Path(cache_directory) / "meta.json").read_text()).get("seconds", round(feature_seconds, 1))
        return {
            "steps": steps,
            "resumed_from_step": self.start,
            "train_seconds": round(self.seconds, 1),
            "feature_seconds": built,
            "machine": machine,
        }


def save_state(directory: Path, recipe: Recipe, optimizer, scheduler, step: int) -> None:
    """A resumable checkpoint: the recipe's trainable weights, then the optimizer's moments and counters."""
    directory.mkdir(parents=True, exist_ok=True)
    recipe.save_weights(directory)
    write_optimizer_state(directory, optimizer, scheduler, step)


def load_state(directory: Path, recipe: Recipe, optimizer, scheduler, device: str = "cpu") -> int:
    """Restore what :func:`save_state` wrote; returns the step to continue from."""
    recipe.load_weights(directory)
    return read_optimizer_state(directory, optimizer, scheduler, device)


def truncate_log(path: Path, step: int) -> None:
    """Keep the log records of steps up to ``step`` (the checkpoint a resumed run starts from)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))


def run_loop(
    recipe: Recipe,
    output: Path,
    parameter_groups: Sequence[dict],
    config,
    *,
    device: torch.device | str = "cpu",
    accelerator=None,
    progress: bool = True,
    description: str = "training",
) -> LoopResult:
    """Train ``parameter_groups`` (AdamW groups) for ``config.steps`` steps, resuming from ``output/checkpoint``.

    ``config`` is the trainer's :class:`RunSettings`: the loop reads its ``steps``, ``learning_rate``,
    ``warmup_steps``, ``max_grad_norm``, ``weight_decay``, ``eval_every``, ``checkpoint_every`` and, where it has
    them, ``adam_betas``.

    With an ``accelerate`` ``accelerator`` of several processes, each process's recipe takes its share of every
    step's pairs, the gradients are averaged across processes before the update, and the main process alone writes
    the log and checkpoints.
    """
    steps, eval_every, checkpoint_every = config.steps, config.eval_every, config.checkpoint_every
    world = accelerator.num_processes if accelerator is not None else 1
    main = accelerator is None or accelerator.is_main_process
    trainable = [parameter for group in parameter_groups for parameter in group["params"]]
    betas = tuple(getattr(config, "adam_betas", (0.9, 0.999)))
    optimizer = torch.optim.AdamW(parameter_groups, lr=config.learning_rate, betas=betas, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, steps)
    state_dir, log_path = output / STATE_DIR, output / LOG_NAME
    latest = latest_checkpoint(state_dir, TRAINER_STATE_NAME)
    start = load_state(latest, recipe, optimizer, scheduler, str(device)) if latest is not None else 0
    if start:
        logger.warning("resuming %s from step %d", output, start)
    if main:
        truncate_log(log_path, start)  # steps logged after the last checkpoint are run again
    rates = recipe.rates or (lambda learning_rates: {"lr": learning_rates[-1]})
    bar = tqdm(total=steps, initial=start, desc=description, disable=not (progress and main))
    began, final_eval = time.time(), None
    for step in range(start, steps):
        loss, fields = recipe.step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            for parameter in trainable:
                if parameter.grad is not None:
                    parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        done = step + 1
        record = {"step": done, **rates(scheduler.get_last_lr()), "grad_norm": float(grad_norm), **fields}
        if done % eval_every == 0 or done == steps:
            final_eval = recipe.evaluate(done)
            record.update(final_eval)
        if main:
            append_rows(log_path, [record])
            if done % checkpoint_every == 0 or done == steps:
                write_checkpoint(state_dir, f"step-{done:08d}", lambda folder: save_state(folder, recipe, optimizer, scheduler, done))
        bar.set_postfix({key: f"{fields[key]:.3f}" for key in ("loss", "lm_loss") if key in fields})
        bar.update(1)
    bar.close()
    return LoopResult(start, time.time() - began, final_eval if final_eval is not None else recipe.evaluate(steps))
