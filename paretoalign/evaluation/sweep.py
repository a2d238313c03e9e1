"""Preference sweeps: every method x preference grid point x prompt, generated, scored and appended to a resumable file.

A sweep directory holds

- ``sweep.json``: the settings (written once; a resume with different settings is refused);
- ``results.jsonl``: one row per (method, preference, prompt), appended batch by batch with fsync;
- ``methods.jsonl``: one line per method per run: peak memory, trainable parameters, device.

A method that ignores the preference (``base``) is run once per prompt and its rows carry
``"preference": null``: its "front" is a single point, which :mod:`~paretoalign.evaluation.report`
evaluates at every grid point for MIP.

Row schema of ``results.jsonl``::

    {"method": "dualhead", "preference": [0.1, 0.9] | null, "prompt_id": "3f2a...", "prompt_index": 0,
     "prompt": "..." | [{"role": ..., "content": ...}], "text": "...", "scores": {"helpfulness": 1.2, ...},
     "tokens": 37, "finish_reason": "eos" | "length", "seconds": 0.12, "model_passes_per_token": 1.0,
     "base_nll": 1.9 | null, "seed": 12345}

``base_nll`` is the frozen backbone's mean per-token negative log-likelihood of the answer, read off the logits the
decoder computes anyway (``null`` for methods that do not expose them, and for empty answers).

``seconds`` is the row's share of its batch's generation time (batch seconds / rows in the batch), so
summed tokens over summed seconds is the method's throughput; scoring time is not included.
``model_passes_per_token`` counts calls of the outermost transformers models held in the decoder's
attributes (a module with a ``pass_fraction``, like the Dual-Head's reward branch, counts as that fraction), plus the batched passes of models the decoder calls itself and reports as ``scorer_passes``
(ARGS's reward scorer), per decoding step of the batch (``null`` when the counter sees no model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..files import append_rows, check_positive_int, check_positive_ints, is_int, read_json_object, read_results, write_json
from ..generation import DecodeSettings, check_prompt
from ..methods import get_method, parse_methods, trainable_parameters
from ..preference import simplex_grid

logger = logging.getLogger(__name__)

SETTINGS_NAME = "sweep.json"
RESULTS_NAME = "results.jsonl"
METHOD_RUNS_NAME = "methods.jsonl"
FORMAT_VERSION = 1
# Settings that may change between runs of one sweep: methods can be added, batches resized, files moved.
NOT_COMPARED = ("methods", "batch_size", "prompts.source", "model.checkpoint", "scorer.describe.source", "scorer.describe.device")
SPLIT_PREFIX = "split:"


# ---------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class SweepPrompt:
    """One prompt of a sweep and its stable content id."""

    id: str
    prompt: str | list[dict]


def prompt_id(prompt: str | list[dict]) -> str:
    """A 16-hex-digit hash of the prompt's content: the same prompt gets the same id in every file."""
    return hashlib.sha256(json.dumps(prompt, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _prompts_from_records(records: list[dict], path: Path) -> list[str | list[dict]]:
    from ..data import parse_hh_pair

    prompts, skipped = [], 0
    for number, record in enumerate(records, start=1):
        where = f"{path}: record {number}"
        if not isinstance(record, (dict, str)):
            raise ValueError(f"{where}: expected a JSON object or string, got {type(record).__name__}")
        if isinstance(record, str):  # a JSON list of prompt strings
            prompts.append(check_prompt(record, where))
        elif "chosen" in record and "rejected" in record:  # HH-RLHF: the dialogue before the last assistant turn
            pair = parse_hh_pair(record, objective="prompt", source=path.name)
            if pair is None:
                skipped += 1
                continue
            prompts.append(pair.prompt)
        elif "prompt" in record:  # {"prompt": ...}, PKU-SafeRLHF too
            prompts.append(check_prompt(record["prompt"], where))
        else:
            raise ValueError(f"{where}: expected a 'prompt' key or HH-RLHF 'chosen'/'rejected' transcripts, got keys {sorted(record)}")
    if skipped:
        logger.info("%s: skipped %d HH-RLHF records with a broken transcript", path, skipped)
    return prompts


def _split_prompts(spec: str) -> list[list[dict]]:
    """``split:test`` or ``split:test:harmlessness``: prompts of the vendored data's split (seed 0)."""
    from ..data import SPLIT_NAMES, load_default_pairs, split_pools

    parts = spec[len(SPLIT_PREFIX) :].split(":")
    if len(parts) > 2 or parts[0] not in SPLIT_NAMES:
        raise ValueError(f"prompts {spec!r} must look like 'split:NAME[:OBJECTIVE]' with NAME one of {list(SPLIT_NAMES)}")
    pools = load_default_pairs()
    objectives = [parts[1]] if len(parts) == 2 else list(pools)
    unknown = [name for name in objectives if name not in pools]
    if unknown:
        raise ValueError(f"prompts {spec!r}: objective {unknown[0]!r} has no vendored pairs; choose from {sorted(pools)}")
    splits = split_pools(pools, seed=0)
    return [pair.prompt for name in objectives for pair in splits[name][parts[0]]]


def load_prompts(source: str | os.PathLike, limit: int | None = None) -> list[SweepPrompt]:
    """Read sweep prompts, de-duplicated, in file order.

    Args:
        source: a ``.jsonl`` / ``.json`` / ``.jsonl.gz`` file of ``{"prompt": text or messages}`` records or of
            HH-RLHF pairs (the dialogue before the last assistant turn); any other file is plain text with
            one prompt a line; or ``split:test[:objective]`` for the vendored data's held-out prompts (seed 0).
        limit: keep the first ``limit`` prompts.
    """
    check_positive_int("limit", limit, optional=True)
    text = str(source)
    if text.startswith(SPLIT_PREFIX):
        raw = _split_prompts(text)
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {text!r} does not exist")
        if path.name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
            from ..data import read_json_values

            raw = _prompts_from_records([value for _, value in read_json_values(path)], path)
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            raw = [line.strip() for line in lines if line.strip()]
    prompts = _first_occurrences(raw)
    if not prompts:
        raise ValueError(f"prompts {text!r} holds no prompts")
    if len(prompts) < len(raw):
        logger.info("%s: dropped %d duplicate prompts", text, len(raw) - len(prompts))
    return prompts[:limit] if limit else prompts


def _first_occurrences(raw: list) -> list[SweepPrompt]:
    seen: dict[str, SweepPrompt] = {}
    for prompt in raw:
        seen.setdefault(prompt_id(prompt), SweepPrompt(prompt_id(prompt), prompt))
    return list(seen.values())


def preference_grid(grid: int, num_objectives: int) -> list[tuple[float, ...]]:
    """``grid`` points per simplex edge: 11 over two objectives gives (0, 1), (0.1, 0.9), ..., (1, 0)."""
    if not is_int(grid, 2):
        raise ValueError(f"grid must be an integer >= 2 (points per preference axis), got {grid!r}")
    return simplex_grid(grid, num_objectives)


# ---------------------------------------------------------------------------------------------- settings


@dataclass(kw_only=True)
class SweepConfig(DecodeSettings):
    """What a sweep runs; ``paretoalign sweep`` builds one from its arguments (the decoding options are
    :class:`~paretoalign.generation.DecodeSettings`', greedy by default)."""

    prompts: str = field(
        metadata={
            "help": "prompts .jsonl/.json(.gz) ({'prompt': ...} or HH-RLHF pairs), a text file (one prompt a line), or "
            "split:test[:objective] for the vendored held-out prompts"
        }
    )
    out: str = field(metadata={"help": "the sweep directory: sweep.json, results.jsonl, methods.jsonl"})
    methods: list[str] = field(
        default_factory=lambda: ["dualhead", "base"],
        metadata={"help": "registered methods (paretoalign.methods), comma- or space-separated: dualhead,base"},
    )
    grid: int = field(default=11, metadata={"help": "preference points per simplex edge (11: 0, 0.1, ..., 1)"})
    temperature: float = field(default=0.0, metadata={"help": "0 is greedy"})
    top_p: float = 1.0
    scorer: str | None = field(default=None, metadata={"help": "reward scorer spec for load_scorer (default: the shipped offline scorer)"})
    limit: int | None = field(default=None, metadata={"help": "sweep only the first N prompts"})
    batch_size: int = field(
        default=64, metadata={"help": "rows (prompt x preference) generated together (64 decodes 1.7x the tokens/s of 16 on 2 CPU cores)"}
    )

    def __post_init__(self):
        super().__post_init__()
        self.methods = parse_methods(self.methods)
        preference_grid(self.grid, 2)
        check_positive_ints(self, ("batch_size",))
        check_positive_ints(self, ("limit",), optional=True)
        if not str(self.out).strip():
            raise ValueError(f"out must name a directory, got {self.out!r}")


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_changes(recorded: dict, requested: dict) -> list[str]:
    """``["grid: 11 -> 5", ...]`` for every compared setting that differs (see :data:`NOT_COMPARED`)."""
    old, new = _flatten(recorded), _flatten(requested)
    changes = []
    for key in sorted(set(old) | set(new)):
        if any(key == skip or key.startswith(skip + ".") for skip in NOT_COMPARED):
            continue
        if old.get(key) != new.get(key):
            changes.append(f"{key}: {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}")
    return changes


def _heads_fingerprint(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.trainable_state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _scorer_spec(spec: str | None, scorer, loaded: bool) -> str:
    """The scorer's spec as ``load_scorer`` reads it, or the class of a scorer handed in."""
    if loaded:
        return "default" if spec is None else str(spec)
    return f"{type(scorer).__module__}.{type(scorer).__qualname__}"


def _describe(scorer) -> dict:
    describe = getattr(scorer, "describe", None)
    return json.loads(json.dumps(describe(), default=str)) if callable(describe) else {}


def record_settings(path: Path, settings: dict, advice: str = "resume with the same settings or use a new --out") -> dict:
    """Write the settings file ``path`` of a resumable output folder, or check ``settings`` against the one there:
    results appended under other settings would mix two experiments, so a change raises ``ValueError`` listing it."""
    if not path.is_file():
        write_json(path, settings)
        return settings
    recorded = read_json_object(path, "settings file")
    changes = settings_changes(recorded, settings)
    if changes:
        raise ValueError(f"{path} was written with different settings; {advice}. Changed: {'; '.join(changes)}")
    return recorded


def _record_settings(directory: Path, settings: dict) -> dict:
    """Write ``sweep.json``, or check it against the existing one (adding new methods to it)."""
    recorded = record_settings(directory / SETTINGS_NAME, settings)
    added = [name for name in settings["methods"] if name not in recorded["methods"]]
    if added:
        recorded["methods"] = recorded["methods"] + added
        write_json(directory / SETTINGS_NAME, recorded)
    return recorded


# ---------------------------------------------------------------------------------------------- results file


def row_key(row: dict) -> tuple:
    """What makes a result row unique: ``(method, preference or None, prompt_id)``."""
    preference = row.get("preference")
    return row["method"], None if preference is None else tuple(float(w) for w in preference), row["prompt_id"]


# ---------------------------------------------------------------------------------------------- measuring


class ModelPassCounter:
    """Counts forward calls of the outermost transformers models a decoder holds (a nested call is part of its caller)."""

    def __init__(self, decoder):
        from transformers import PreTrainedModel

        models: dict[int, torch.nn.Module] = {}
        for value in vars(decoder).values():
            if isinstance(value, torch.nn.Module):
                for module in value.modules():
                    if isinstance(module, PreTrainedModel) or hasattr(module, "pass_fraction"):
                        models[id(module)] = module
        self.models = list(models.values())
        self._decoder, self._scorer_start = decoder, 0
        self.passes = 0
        self._depth = 0
        self._handles = []

    def _enter(self, module, args):
        if self._depth == 0:
            # a part of a model run on its own (the Dual-Head's reward branch: k of N blocks) counts as that part
            self.passes += getattr(module, "pass_fraction", 1)
        self._depth += 1

    def _exit(self, module, args, output):
        self._depth -= 1

    @property
    def total(self) -> int:
        """Backbone-side passes plus the passes a decoder reports for models it calls itself (ARGS's scorer)."""
        return self.passes + getattr(self._decoder, "scorer_passes", 0) - self._scorer_start

    def __enter__(self):
        self._scorer_start = getattr(self._decoder, "scorer_passes", 0)
        for module in self.models:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._exit, always_call=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class PeakMemory:
    """Peak memory while a method runs: ``torch.cuda.max_memory_allocated`` on a GPU, else the process's peak RSS.

    On Linux the process peak RSS is reset by :meth:`start` (``/proc/self/clear_refs``); where that is
    not possible the value is the peak since the process started, and ``kind`` says so.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.kind = ""

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_memory_allocated"
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.kind = "process_peak_rss"
        except OSError:
            self.kind = "process_peak_rss_since_start"
        return self

    def read(self) -> int:
        """Peak bytes since :meth:`start`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            status = Path("/proc/self/status").read_text()
            return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
        except (OSError, StopIteration, ValueError):
            self.kind = "process_peak_rss_since_start"
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def row_seed(seed: int, prompt_id: str) -> int:
    """The sampling seed of every row of a prompt: the same for all methods and preferences (common random numbers)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:4], "big")


# ---------------------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class _Job:
    method: str
    preference: tuple[float, ...] | None
    prompt_index: int
    prompt: SweepPrompt


def _batches(jobs: list[_Job], batch_size: int) -> Iterator[list[_Job]]:
    for start in range(0, len(jobs), batch_size):
        yield jobs[start : start + batch_size]


def _score_columns(scorer, objectives: Sequence[str]) -> list[int]:
    """Column of the scorer's output for each sweep objective."""
    names = list(getattr(scorer, "objectives", ()))
    if sorted(names) != sorted(objectives):
        raise ValueError(f"scorer objectives {names} do not match the model's objectives {list(objectives)}")
    return [names.index(name) for name in objectives]


def _load_scorer(spec: str | None, device):
    from ..scorers.rewards import load_scorer

    return load_scorer(spec, device=device)


def run_sweep(
    config: SweepConfig,
    *,
    model=None,
    scorer=None,
    progress: bool = True,
    after_batch: Callable[[list[dict]], None] | None = None,
) -> dict:
    """Run (or resume) the sweep ``config`` describes; rows already in ``results.jsonl`` are skipped.

    Args:
        model: a loaded :class:`~paretoalign.model.DualHeadModel`; default ``config.load_model(config.dtype)``.
        scorer: a reward scorer (``objectives``, ``score(prompts, responses, batch_size)``, ``describe()``);
            default ``load_scorer(config.scorer)``.
        after_batch: called with each batch's rows once they are on disk.

    Returns:
        ``{"directory", "written", "skipped", "total"}``: rows written now, rows found done, rows in the sweep.
    """
    prompts = load_prompts(config.prompts, config.limit)
    model = model if model is not None else config.load_model(config.dtype)
    scorer_loaded = scorer is None
    scorer = _load_scorer(config.scorer, model.device) if scorer_loaded else scorer
    objectives = list(model.objectives)
    _score_columns(scorer, objectives)
    grid = preference_grid(config.grid, len(objectives))
    directory = Path(config.out).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    _record_settings(directory, _settings(config, model, scorer, scorer_loaded, prompts, grid))
    results_path = directory / RESULTS_NAME
    done = {row_key(row) for row in read_results(results_path, repair=True)}

    jobs: dict[str, list[_Job]] = {}
    total = 0
    for name in config.methods:
        points = grid if get_method(name).uses_preference else [None]
        every = [_Job(name, point, index, prompt) for index, prompt in enumerate(prompts) for point in points]
        total += len(every)
        pending_jobs = [job for job in every if (name, job.preference, job.prompt.id) not in done]
        # Batches of similar prompt lengths pad less (prefill of left-padded prompts dominates long prompts).
        jobs[name] = sorted(pending_jobs, key=lambda job: len(json.dumps(job.prompt.prompt, ensure_ascii=False)))
    pending = sum(len(todo) for todo in jobs.values())
    bar = _progress(pending, progress)
    written = 0
    try:
        for name, todo in jobs.items():
            if todo:
                written += _run_method(name, todo, config, model, scorer, directory, bar, after_batch)
    finally:
        bar.close()
    return {"directory": str(directory), "written": written, "skipped": total - pending, "total": total}


def _settings(config: SweepConfig, model, scorer, scorer_loaded: bool, prompts: list[SweepPrompt], grid) -> dict:
    from ..backbone import precision_record

    return {
        "format": FORMAT_VERSION,
        "objectives": list(model.objectives),
        "grid": config.grid,
        "preferences": [list(point) for point in grid],
        "methods": list(config.methods),
        "prompts": {
            "source": str(config.prompts),
            "limit": config.limit,
            "count": len(prompts),
            "fingerprint": hashlib.sha256("\n".join(p.id for p in prompts).encode()).hexdigest()[:16],
        },
        "model": {
            "checkpoint": None if config.checkpoint is None else str(Path(config.checkpoint).expanduser().resolve()),
            "backbone": model.config.backbone,
            "heads_fingerprint": _heads_fingerprint(model),
            **precision_record(model.backbone),
        },
        "scorer": {"spec": _scorer_spec(config.scorer, scorer, scorer_loaded), "describe": _describe(scorer)},
        "sampling": {
            "max_new_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "top_k": config.top_k,
            "seed": config.seed,
            # recorded when on, so a sweep written before the guard existed still resumes
            **({"no_repeat_ngram_size": guard} if (guard := _loop_guard(config, model)) else {}),
        },
        "strength": config.strength,
        "fusion": config.fusion,
        "guidance_top_k": config.guidance_top_k,
        # recorded when set, so a sweep written before the option existed still resumes
        **({"method_checkpoint": config.method_checkpoint} if config.method_checkpoint is not None else {}),
        "system_prompt": config.system_prompt,
        "batch_size": config.batch_size,
    }


def _loop_guard(config: SweepConfig, model) -> int:
    """The sweep's n-gram loop guard: its own setting, else the checkpoint's."""
    return model.config.no_repeat_ngram_size if config.no_repeat_ngram_size is None else config.no_repeat_ngram_size


def _run_method(name: str, todo: list[_Job], config: SweepConfig, model, scorer, directory: Path, bar, after_batch) -> int:
    """Generate, score and append every pending row of one method; log its measurements to ``methods.jsonl``."""
    from ..generation import COMPILED_METHODS, MODEL_METHODS, generate, make_decoder

    objectives = list(model.objectives)
    columns = _score_columns(scorer, objectives)
    uniform = [1.0 / len(objectives)] * len(objectives)  # what a method that ignores the preference is handed
    compile = config.compile and name in COMPILED_METHODS
    own = config.method_checkpoint if name not in MODEL_METHODS else None  # the Dual-Head's and base's are the model's
    decoder = make_decoder(model, name, config.fusion, config.strength, config.guidance_top_k, compile, config.max_new_tokens, own)
    counter = ModelPassCounter(decoder)
    memory = PeakMemory(model.device).start()
    written = 0
    try:
        for batch in _batches(todo, config.batch_size):
            prompts = [job.prompt.prompt for job in batch]
            seeds = [row_seed(config.seed, job.prompt.id) for job in batch]
            preference = torch.tensor([job.preference or uniform for job in batch], dtype=torch.float64)  # (B, k)
            counter.passes = 0
            start = time.perf_counter()
            with counter:
                generations = generate(
                    model, prompts, preference, decoder=decoder, system_prompt=config.system_prompt,
                    max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                    top_k=config.top_k, seed=seeds, no_repeat_ngram_size=_loop_guard(config, model),
                )
            seconds = time.perf_counter() - start
            # Decoding steps of the batch: a row that stopped at eos took one step past its last token.
            steps = max(min(len(g.token_ids) + (g.finish_reason == "eos"), config.max_new_tokens) for g in generations)
            scores = np.asarray(scorer.score(prompts, [g.text for g in generations], batch_size=len(batch)), dtype=np.float64)
            if scores.shape != (len(batch), len(objectives)):
                raise ValueError(f"scorer returned shape {scores.shape} for {len(batch)} responses and {len(objectives)} objectives")
            rows = [
                {
                    "method": name,
                    "preference": None if job.preference is None else list(job.preference),
                    "prompt_id": job.prompt.id,
                    "prompt_index": job.prompt_index,
                    "prompt": job.prompt.prompt,
                    "text": generation.text,
                    "scores": {objective: float(scores[row, column]) for objective, column in zip(objectives, columns)},
                    "tokens": len(generation.token_ids),
                    "finish_reason": generation.finish_reason,
                    "seconds": seconds / len(batch),
                    "model_passes_per_token": counter.total / steps if counter.models else None,
                    "base_nll": generation.base_nll,
                    "seed": seed,
                }
                for row, (job, generation, seed) in enumerate(zip(batch, generations, seeds))
            ]
            append_rows(directory / RESULTS_NAME, rows)
            written += len(rows)
            bar.update(len(rows))
            if after_batch is not None:
                after_batch(rows)
    finally:
        # Logged even when interrupted: the measurements of the rows that did finish are still true.
        record = {
            "method": name,
            "rows": written,
            "device": str(model.device),
            "trainable_parameters": trainable_parameters(decoder),
            "peak_memory_bytes": memory.read(),
            "memory_kind": memory.kind,
            "finished_at": time.time(),
        }
        append_rows(directory / METHOD_RUNS_NAME, [record])
    return written


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sweep", unit="row", disable=not enabled)
