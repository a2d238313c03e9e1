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
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .files import (
    TRAINER_STATE_NAME,
    append_rows,
    atomic_write,
    latest_checkpoint,
    read_optimizer_state,
    write_checkpoint,
    write_optimizer_state,
)

logger = logging.getLogger(__name__)
LOG_NAME = "training_log.jsonl"
STATE_DIR = "checkpoint"


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

    ``config`` is the trainer's config: the loop reads its ``steps``, ``learning_rate``, ``warmup_steps``,
    ``max_grad_norm``, ``weight_decay``, ``eval_every``, ``checkpoint_every`` and, where it has them, ``adam_betas``.

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
