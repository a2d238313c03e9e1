"""On-policy replies: the frozen backbone samples ``k`` replies to each training prompt, for teachers to label.

Human preference pairs compare replies the backbone would rarely write. Pairs of its *own* replies, labelled by a
teacher per objective (:mod:`paretoalign.teachers`), teach the reward head on the token distribution it steers at
decoding time: where the backbone sometimes declines a harmful request and sometimes complies, a pair of the two
shows the head which first tokens each objective prefers.

A sampling run writes a folder: ``replies.json`` (the settings and provenance: backbone, fingerprints, sampling,
prompt file) and ``replies.jsonl``, one line per prompt ``{"prompt_id", "prompt", "source", "replies", "finish",
"seeds"}``. Lines are appended batch after batch and fsynced, so an interrupted run resumes where it stopped; a run
with other settings refuses to append to the folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import REPLIES_NAME, read_replies  # noqa: F401 (read_replies: the folders this module writes)
from .evaluation.sweep import load_prompts, record_settings, row_seed
from .files import append_rows, check_positive_ints, is_int, read_results

SETTINGS_NAME = "replies.json"
FORMAT_VERSION = 1


@dataclass
class SampleConfig:
    """What to sample: ``k`` replies of the base model to every prompt of ``prompts``."""

    prompts: str = field(metadata={"help": "a prompts file (.jsonl records with 'prompt' and 'source', or text lines)"})
    out: str = field(metadata={"help": "folder for replies.json and replies.jsonl"})
    k: int = field(default=4, metadata={"help": "replies per prompt"})
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = field(default=0, metadata={"help": "each reply's seed derives from it and the prompt"})
    limit: int | None = field(default=None, metadata={"help": "sample the first N prompts only"})
    skip: int = field(
        default=0,
        metadata={
            "help": "leave out the first N prompts (with limit: prompts N+1 to limit), e.g. to sample more prompts of a "
            "file into a new folder without repeating those an earlier folder holds"
        },
    )
    batch_size: int = field(default=32, metadata={"help": "replies decoded together"})
    backbone: str | None = field(default=None, metadata={"help": "backbone id or path (default: the offline SmolLM2)"})
    dtype: str = field(
        default="auto",
        metadata={"help": "backbone precision: auto (bf16 on a GPU, fp32 on a CPU), float32, bfloat16 (faster on CPUs with bf16 instructions)"},
    )
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "a system message the backbone sees while sampling (e.g. one asking it to decline harmful requests); "
            "the replies are stored, and trained on, under the plain prompt"
        },
    )

    reply_prefixes: list[str] | None = field(
        default=None,
        metadata={
            "help": "openings the replies start with (reply i of a prompt takes prefix i modulo their number); the "
            "backbone writes the rest, and the stored reply is opening + continuation"
        },
    )

    def __post_init__(self):
        if self.reply_prefixes is not None:
            if isinstance(self.reply_prefixes, str) or not self.reply_prefixes or not all(
                isinstance(prefix, str) and prefix.strip() for prefix in self.reply_prefixes
            ):
                raise ValueError(f"reply_prefixes must be a non-empty list of non-empty strings, got {self.reply_prefixes!r}")
            self.reply_prefixes = list(self.reply_prefixes)
        check_positive_ints(self, ("k", "max_new_tokens", "batch_size"))
        from .backbone import parse_dtype

        parse_dtype(self.dtype)
        if not is_int(self.skip, 0):
            raise ValueError(f"skip must be a non-negative integer, got {self.skip!r}")
        if self.k < 2:
            raise ValueError(f"k must be at least 2 (pairs need two replies of a prompt), got {self.k!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (replies of one prompt must differ), got {self.temperature!r}")


def prompt_sources(path: str | os.PathLike) -> dict[str, str]:
    """``{prompt_id: source}`` for the records of a ``.jsonl`` prompts file that name their ``source``."""
    from .data import read_json_values
    from .evaluation.sweep import prompt_id

    path = Path(path)
    if not path.name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return {}
    return {
        prompt_id(value["prompt"]): str(value["source"])
        for _, value in read_json_values(path)
        if isinstance(value, dict) and "prompt" in value and "source" in value
    }


def _settings(config: SampleConfig, model) -> dict:
    from .backbone import precision_record

    settings = {key: value for key, value in asdict(config).items() if key not in ("out", "batch_size", "limit", "skip", "backbone", "dtype")}
    settings.update(precision_record(model.backbone))  # the precision the replies were sampled in, not the one asked for
    for name in ("system_prompt", "reply_prefixes"):
        if settings[name] is None:
            del settings[name]  # folders sampled without them read the same as before the options existed
    settings.update(
        format=FORMAT_VERSION,
        backbone=model.config.backbone,
        weights_fingerprint=model.config.weights_fingerprint,
        tokenizer_fingerprint=model.config.tokenizer_fingerprint,
        method="base",
    )
    return settings


def _prefix(prefixes: list[str] | None, index: int) -> str:
    return prefixes[index % len(prefixes)] if prefixes else ""


def _row(prompt, prefixes: list[str] | None, index: int):
    """What the backbone continues for reply ``index``: the prompt, or the prompt with the reply's opening as a
    started assistant message."""
    if not prefixes:
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [*messages, {"role": "assistant", "content": _prefix(prefixes, index)}]


def sample_replies(config: SampleConfig, model=None, progress: bool = True) -> dict:
    """Sample (or finish sampling) ``config.k`` base-model replies to each prompt; returns counts and the folder."""
    from .generation import generate
    from .model import base_model

    prompts = load_prompts(config.prompts, config.limit)[config.skip :]
    if not prompts:
        raise ValueError(f"skip={config.skip} leaves no prompts of {config.prompts} (limit={config.limit})")
    sources = prompt_sources(config.prompts)
    model = model or base_model(config.backbone, dtype=config.dtype)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(config, model)
    record_settings(out / SETTINGS_NAME, settings, "use a new out folder")
    done = {row["prompt_id"] for row in read_results(out / REPLIES_NAME, repair=True)}
    todo = [prompt for prompt in prompts if prompt.id not in done]
    per_batch = max(1, config.batch_size // config.k)
    # Prompts of similar length share a batch, so little of a batch is padding.
    todo.sort(key=lambda prompt: len(json.dumps(prompt.prompt, ensure_ascii=False)))
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="sampling replies", disable=not progress)
    for start in range(0, len(todo), per_batch):
        batch = todo[start : start + per_batch]
        rows = [_row(prompt.prompt, config.reply_prefixes, index) for prompt in batch for index in range(config.k)]
        seeds = [row_seed(config.seed, f"{prompt.id}:{index}") for prompt in batch for index in range(config.k)]
        with torch.no_grad():
            answers = generate(
                model, rows, [1.0 / model.config.num_objectives] * model.config.num_objectives, method="base", max_new_tokens=config.max_new_tokens,
                temperature=config.temperature, top_p=config.top_p, seed=seeds, system_prompt=config.system_prompt,
            )
        lines = []
        for i, prompt in enumerate(batch):
            mine = answers[i * config.k : (i + 1) * config.k]
            lines.append(
                {
                    "prompt_id": prompt.id,
                    "prompt": prompt.prompt,
                    "source": sources.get(prompt.id),
                    "replies": [_prefix(config.reply_prefixes, index) + answer.text for index, answer in enumerate(mine)],
                    "finish": [answer.finish_reason for answer in mine],
                    "seeds": seeds[i * config.k : (i + 1) * config.k],
                }
            )
        append_rows(out / REPLIES_NAME, lines)
        bar.update(len(batch))
    bar.close()
    return {"directory": str(out), "written": len(todo), "skipped": len(prompts) - len(todo), "total": len(prompts)}
