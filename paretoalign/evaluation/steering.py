"""Does the preference steer? Refusals on harmful and benign prompts, fluency, and fronts, from two sweeps.

A steering evaluation is two sweep directories over the same methods and grid: one on harmful prompts, one on
benign prompts (:func:`write_steering_prompts` makes both from a split of the vendored data). Per method and
preference it reports the refusal share (:mod:`~paretoalign.refusal`) with a bootstrap 95% interval,
the scorer's mean rewards, the repeated-4-gram share, the base model's mean per-token NLL of the answers, and the
share of prompts whose answer changes with the preference; and the selective-steering statistic

    (harmful refusals at w_last - at w_first) - (benign refusals at w_last - at w_first)

with a paired bootstrap interval (prompts resampled within each set; the same resample for both ends).
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write, check_positive_int, is_int, write_json
from ..refusal import is_refusal
from .sweep import RESULTS_NAME, append_rows, prompt_id, read_results, row_key

NLL_NAME = "base_nll.jsonl"
SETS = ("harmful", "benign")
# Which objective's prompts make each set: harmlessness pairs are red-team (HH harmless-base) and PKU-SafeRLHF
# prompts, helpfulness pairs are everyday requests.
SET_OBJECTIVE = {"harmful": "harmlessness", "benign": "helpfulness"}


@dataclass
class SteeringPromptsConfig:
    """Which held-out prompt sets ``paretoalign steering-prompts`` writes (the arguments of :func:`write_steering_prompts`)."""

    out: str = field(metadata={"help": "folder for {split}-harmful.jsonl and {split}-benign.jsonl"})
    split: str = field(default="validation", metadata={"help": "train, validation or test"})
    per_set: int = field(default=100, metadata={"help": "distinct prompts per set (a seeded random sample)"})
    seed: int = field(default=0, metadata={"help": "the sample's seed"})

    def write(self) -> dict:
        return write_steering_prompts(self.out, self.split, self.per_set, self.seed)


def write_steering_prompts(
    out: str | os.PathLike, split: str = "validation", per_set: int = 100, seed: int = 0, max_chars: int = 600
) -> dict:
    """Write ``{out}/{split}-harmful.jsonl`` and ``{split}-benign.jsonl``: ``per_set`` distinct prompts of the
    split each, a seeded random sample (``{"prompt": ..., "source": ...}`` a line) of the prompts whose messages
    hold at most ``max_chars`` characters in all (long red-team dialogues would make the evaluation about prefill,
    not steering). Returns ``{set: path}``."""
    from ..data import SPLIT_NAMES, load_default_pairs, split_pools

    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
    check_positive_int("per_set", per_set)
    splits = split_pools(load_default_pairs())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, objective in SET_OBJECTIVE.items():
        distinct: dict[str, dict] = {}
        for pair in splits[objective][split]:
            if sum(len(message["content"]) for message in pair.prompt) > max_chars:
                continue
            distinct.setdefault(prompt_id(pair.prompt), {"prompt": pair.prompt, "source": pair.source})
        records = sorted(distinct.values(), key=lambda record: prompt_id(record["prompt"]))
        random.Random(seed).shuffle(records)
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records[:per_set])
        paths[name] = out / f"{split}-{name}.jsonl"
        atomic_write(paths[name], lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))
    return paths


# ---------------------------------------------------------------------------------------------- text measures


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """Share of the answer's word ``n``-grams that repeat an earlier one (0 for answers shorter than ``n`` words)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@torch.no_grad()
def base_nll(model, prompts: Sequence, texts: Sequence[str], batch_size: int = 8) -> list[float | None]:
    """The frozen backbone's mean per-token negative log-likelihood of each answer after its templated prompt
    (``None`` for an empty answer)."""
    from ..generation import render_prompt

    tokenizer, backbone = model.tokenizer, model.backbone
    results: list[float | None] = []
    for start in range(0, len(texts), batch_size):
        chunk_prompts, chunk_texts = prompts[start : start + batch_size], texts[start : start + batch_size]
        prompt_ids = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in chunk_prompts]
        answer_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in chunk_texts]
        longest = max(len(p) + len(a) for p, a in zip(prompt_ids, answer_ids))
        input_ids = torch.full((len(chunk_texts), longest), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros_like(input_ids)  # (B, T)
        answer = torch.zeros_like(input_ids, dtype=torch.bool)  # (B, T) answer tokens
        for row, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
            ids = p + a
            input_ids[row, longest - len(ids) :] = torch.tensor(ids)
            mask[row, longest - len(ids) :] = 1
            answer[row, longest - len(a) :] = len(a) > 0
        device = model.device
        logits = backbone(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None].to(device)).squeeze(-1)  # (B, T-1)
        targets = answer[:, 1:].to(device)  # (B, T-1) predicting answer tokens
        for row in range(len(chunk_texts)):
            count = int(targets[row].sum())
            results.append(None if count == 0 else float(-(logprobs[row][targets[row]]).mean()))
    return results


def add_base_nll(directory: str | os.PathLike, model, batch_size: int = 8) -> dict[tuple, float | None]:
    """The base NLL of every row of a sweep directory, computed once and appended to ``base_nll.jsonl`` (resumable)."""
    directory = Path(directory)
    rows = read_results(directory / RESULTS_NAME)
    path = directory / NLL_NAME
    done = {row_key(r): r["nll"] for r in read_results(path, repair=True)} if path.is_file() else {}
    todo = [row for row in rows if row_key(row) not in done and row.get("base_nll") is None]  # decoders record most
    for start in range(0, len(todo), 64):
        chunk = todo[start : start + 64]
        values = base_nll(model, [r["prompt"] for r in chunk], [r["text"] for r in chunk], batch_size)
        records = [{"method": r["method"], "preference": r["preference"], "prompt_id": r["prompt_id"], "nll": v} for r, v in zip(chunk, values)]
        append_rows(path, records)
        done.update({row_key(r): value for r, value in zip(chunk, values)})
    return done


# ---------------------------------------------------------------------------------------------- statistics


def bootstrap_interval(values: Sequence[float], samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def selective_steering(
    harmful: tuple[Sequence[float], Sequence[float]], benign: tuple[Sequence[float], Sequence[float]], samples: int = 2000, seed: int = 0
) -> dict:
    """``(mean harmful[1] - harmful[0]) - (mean benign[1] - benign[0])``, with a paired bootstrap 95% interval.

    ``harmful`` and ``benign`` are each ``(values at the first end, values at the other end)`` per prompt, aligned.
    """
    rises = [np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64) for a, b in (harmful, benign)]
    estimate = float(rises[0].mean() - rises[1].mean())
    rng = np.random.default_rng(seed)
    boot = np.zeros(samples)
    for rise, sign in zip(rises, (1.0, -1.0)):
        boot += sign * rise[rng.integers(0, rise.size, size=(samples, rise.size))].mean(axis=1)
    return {"estimate": estimate, "low": float(np.percentile(boot, 2.5)), "high": float(np.percentile(boot, 97.5))}


def _preference_label(preference) -> str:
    return "—" if preference is None else "(" + ", ".join(f"{w:g}" for w in preference) + ")"


def _folders(found) -> list[Path]:
    """One sweep directory or several -> a list of paths."""
    return [Path(found)] if isinstance(found, (str, os.PathLike)) else [Path(d) for d in found]


def steering_summary(directories: dict[str, str | os.PathLike], nll: dict[str, dict] | None = None) -> dict:
    """Per set, method and preference: refusal share and interval, scores, fluency, change share; and per method the
    selective-steering statistic between the grid's two ends (the first and the last preference).

    ``directories``: ``{"harmful": sweep dir or dirs, "benign": the same number of dirs}``; with several dirs a method
    met in more than one is named ``method (parent folder name)``. ``nll``: ``{set: add_base_nll(...)}`` merged over
    a set's dirs.
    """
    table, per_prompt, objectives = {}, {}, None
    for name, found in directories.items():
        groups: dict[tuple, list[dict]] = defaultdict(list)
        folders = _folders(found)
        loaded = [(folder, read_results(folder / RESULTS_NAME)) for folder in folders]
        seen = defaultdict(int)
        for _, rows in loaded:
            for method in {row["method"] for row in rows}:
                seen[method] += 1
        for folder, rows in loaded:
            objectives = json.loads((folder / "sweep.json").read_text())["objectives"]
            rows = list({row_key(row): row for row in rows}.values())  # one row per (method, preference, prompt)
            for row in rows:
                method = row["method"] if seen[row["method"]] == 1 else f"{row['method']} ({folder.parent.name})"
                row = {**row, "_folder": str(folder)}
                groups[(method, None if row["preference"] is None else tuple(row["preference"]))].append(row)
        for (method, preference), rows in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] or ())):
            rows.sort(key=lambda r: r["prompt_id"])
            refusals = [float(is_refusal(r["text"])) for r in rows]
            low, high = bootstrap_interval(refusals)
            nlls = [
                v
                for v in (r.get("base_nll") if r.get("base_nll") is not None else (nll or {}).get(name, {}).get((r["_folder"], *row_key(r))) for r in rows)
                if v is not None
            ]
            scores = {o: np.array([r["scores"][o] for r in rows]) for o in objectives}
            entry = {
                "n": len(rows),
                "refusal": float(np.mean(refusals)),
                "refusal_low": low,
                "refusal_high": high,
                "repeated_4gram": float(np.mean([repeated_ngram_share(r["text"]) for r in rows])),
                "base_nll": float(np.mean(nlls)) if nlls else None,
                **{f"score/{o}": float(v.mean()) for o, v in scores.items()},
                **{f"score_se/{o}": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0 for o, v in scores.items()},
            }
            table.setdefault(name, {}).setdefault(method, {})[_preference_label(preference)] = entry
            per_prompt.setdefault(name, {}).setdefault(method, {})[preference] = {r["prompt_id"]: r for r in rows}
    methods = sorted({m for sets in per_prompt.values() for m in sets})
    selective, changed = {}, {}
    for method in methods:
        for name in directories:
            by_preference = per_prompt.get(name, {}).get(method, {})
            points = sorted(p for p in by_preference if p is not None)
            if len(points) >= 2:
                ids = sorted(set.intersection(*(set(by_preference[p]) for p in points)))
                changed.setdefault(method, {})[name] = float(
                    np.mean([len({by_preference[p][i]["text"] for p in points}) > 1 for i in ids])
                )
        ends = {}
        for name in directories:
            by_preference = per_prompt.get(name, {}).get(method, {})
            points = sorted(p for p in by_preference if p is not None)
            if len(points) < 2:
                break
            first, last = points[-1], points[0]  # grid order (0,1)...(1,0): first = (1, 0), last = (0, 1)
            ids = sorted(set(by_preference[first]) & set(by_preference[last]))
            ends[name] = tuple([float(is_refusal(by_preference[p][i]["text"])) for i in ids] for p in (first, last))
        if len(ends) == 2:
            selective[method] = {"from": list(first), "to": list(last), **selective_steering(ends["harmful"], ends["benign"])}
    fronts = {}
    for name in directories:
        for method, by_preference in per_prompt.get(name, {}).items():
            points = sorted((p for p in by_preference if p is not None), reverse=True)  # (1, 0) first
            if len(points) >= 2:
                fronts.setdefault(name, {})[method] = front_steps(by_preference, points, objectives)
    return {"objectives": objectives, "sets": table, "selective": selective, "changed": changed, "fronts": fronts}


def _paired(by_preference: dict, a, b, objective: str) -> tuple[float, float]:
    """Mean and standard error of the per-prompt score change from preference ``a`` to ``b``."""
    ids = sorted(set(by_preference[a]) & set(by_preference[b]))
    diff = np.array([by_preference[b][i]["scores"][objective] - by_preference[a][i]["scores"][objective] for i in ids])
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0


def front_steps(by_preference: dict, points: list, objectives: Sequence[str]) -> dict:
    """Per objective, along the grid from the first point to the last: the change between the ends (paired mean and
    SE, in SEs), the largest step between neighbours against the ends' direction (in its own SEs), and how many
    interior points differ from both ends by more than 2 paired SEs."""
    result = {}
    for objective in objectives:
        change, se = _paired(by_preference, points[0], points[-1], objective)
        sign = 1.0 if change >= 0 else -1.0
        backward = [(-sign * step) / max(step_se, 1e-12) for step, step_se in (_paired(by_preference, a, b, objective) for a, b in zip(points, points[1:]))]
        interior = 0
        for point in points[1:-1]:
            apart = [abs(m) > 2 * s for m, s in (_paired(by_preference, end, point, objective) for end in (points[0], points[-1]))]
            interior += all(apart)
        result[objective] = {
            "change": change, "se": se, "change_in_se": change / se if se else float("inf"),
            "worst_backward_step_in_se": max(backward), "interior_apart_from_both_ends": interior, "points": len(points),
        }
    return result


def markdown_steering(summary: dict) -> str:
    objectives = summary["objectives"]
    lines = ["# Steering evaluation", ""]
    lines.append(
        "Refusal share with a bootstrap 95% interval; scores are the sweep's scorer (mean); rep4 = repeated-4-gram share; "
        "NLL = the base model's mean per-token NLL of the answers."
    )
    for name, methods in summary["sets"].items():
        lines += ["", f"## {name} prompts", ""]
        header = "| method | w | n | refusal | 95% CI | " + " | ".join(objectives) + " | rep4 | NLL |"
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        for method, points in methods.items():
            for label, e in points.items():
                score_cells = " | ".join(f"{e[f'score/{o}']:.3f} ± {e[f'score_se/{o}']:.3f}" for o in objectives)
                nll = "—" if e["base_nll"] is None else f"{e['base_nll']:.2f}"
                lines.append(
                    f"| {method} | {label} | {e['n']} | {e['refusal']:.2f} | {e['refusal_low']:.2f}–{e['refusal_high']:.2f} | "
                    f"{score_cells} | {e['repeated_4gram']:.3f} | {nll} |"
                )
    lines += ["", "## Fronts: score change from the first grid point to the last (paired over prompts)", ""]
    lines += ["| set | method | objective | change ± SE | in SEs | worst backward step (SEs) | interior points apart from both ends |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for name, methods in summary.get("fronts", {}).items():
        for method, by_objective in methods.items():
            for objective, f in by_objective.items():
                lines.append(
                    f"| {name} | {method} | {objective} | {f['change']:+.3f} ± {f['se']:.3f} | {f['change_in_se']:+.1f} | "
                    f"{f['worst_backward_step_in_se']:.1f} | {f['interior_apart_from_both_ends']} of {f['points'] - 2} |"
                )
    lines += ["", "## Selective steering and answers that change with w", ""]
    lines += ["| method | harmful rise − benign rise | 95% CI | changed (harmful) | changed (benign) |", "|---|---|---|---|---|"]
    for method in sorted(set(summary["selective"]) | set(summary["changed"])):
        s = summary["selective"].get(method)
        c = summary["changed"].get(method, {})
        cells = ("—", "—") if s is None else (f"{s['estimate']:+.2f}", f"{s['low']:+.2f} to {s['high']:+.2f}")
        lines.append(f"| {method} | {cells[0]} | {cells[1]} | {c.get('harmful', float('nan')):.2f} | {c.get('benign', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


@dataclass
class SteeringReportConfig:
    """What ``paretoalign steering-report`` reads and writes (the arguments of :func:`write_steering_report` and
    :func:`markdown_samples`)."""

    harmful: list[str] = field(metadata={"help": "sweep directories over harmful prompts"})
    benign: list[str] = field(metadata={"help": "sweep directories over benign prompts"})
    out: str = field(metadata={"help": "where steering.json and steering.md go"})
    nll: bool = field(default=True, metadata={"help": "measure the base model's NLL of the answers (loads the backbone)"})
    samples: int = field(default=0, metadata={"help": "also write samples.md: N random prompts per set answered at both ends"})
    backbone: str | None = field(
        default=None, metadata={"help": "the base model whose NLL of the answers is reported (default: the offline SmolLM2)"}
    )

    def __post_init__(self) -> None:
        if not is_int(self.samples, 0):
            raise ValueError(f"samples must be 0 (none) or a positive number of prompts per set, got {self.samples!r}")

    def write(self) -> dict:
        """Write steering.json, steering.md (and samples.md); returns the summary."""
        model = None
        if self.nll:
            from ..model import base_model

            model = base_model(self.backbone)  # the frozen backbone (its untrained heads change nothing): NLL of the answers
        directories = {"harmful": self.harmful, "benign": self.benign}
        summary = write_steering_report(directories, self.out, model)
        if self.samples:
            text = markdown_samples(directories, self.samples)
            atomic_write(Path(self.out) / "samples.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return summary


def write_steering_report(directories: dict[str, str | os.PathLike], out: str | os.PathLike, model=None) -> dict:
    """Compute (and cache) base NLLs when ``model`` is given, then write ``steering.json`` and ``steering.md``."""
    unknown = sorted(set(directories) - set(SETS))
    if unknown:
        raise ValueError(f"directories must be keyed by {SETS}, got {sorted(directories)}")
    nll = None
    if model is not None:
        nll = {}
        for name, found in directories.items():
            for folder in _folders(found):
                values = add_base_nll(folder, model)
                nll.setdefault(name, {}).update({(str(Path(folder)), *key): value for key, value in values.items()})
    summary = steering_summary(directories, nll)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "steering.json", summary, sort_keys=False)
    atomic_write(out / "steering.md", lambda tmp: Path(tmp).write_text(markdown_steering(summary)))
    return summary


def _last_user_turn(prompt) -> tuple[str, bool]:
    if isinstance(prompt, str):
        return prompt, False
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return (users[-1] if users else prompt[-1]["content"]), len(prompt) > 1


def markdown_samples(directories: dict[str, str | os.PathLike], per_set: int = 20, seed: int = 0, method: str = "dualhead") -> str:
    """``per_set`` prompts drawn at random (``seed``) from each set's sweeps, each answered at both ends of the grid
    by ``method`` and by the base model where the sweeps hold it, verbatim (nothing picked by hand)."""
    lines = [
        "# Answers from both ends of the slider (verbatim)",
        "",
        f"{per_set} prompts drawn at random (seed {seed}) from each set; w = (helpfulness, harmlessness). "
        "Nothing here was picked by hand.",
    ]
    for name, found in directories.items():
        rows = [row for folder in _folders(found) for row in read_results(folder / RESULTS_NAME)]
        ours = defaultdict(dict)
        base = {}
        for row in rows:
            if row["method"] == method and row["preference"] is not None:
                ours[row["prompt_id"]][tuple(row["preference"])] = row
            elif row["method"] == "base":
                base[row["prompt_id"]] = row
        points = sorted({p for answers in ours.values() for p in answers})
        if len(points) < 2:
            continue
        first, last = points[-1], points[0]  # (1, 0) and (0, 1)
        ids = sorted(i for i, answers in ours.items() if first in answers and last in answers)
        chosen = sorted(random.Random(seed).sample(ids, min(per_set, len(ids))), key=ids.index)
        lines += ["", f"## {name} prompts"]
        for number, chosen_id in enumerate(chosen, start=1):
            text, multi = _last_user_turn(ours[chosen_id][first]["prompt"])
            lines += ["", f"### {number}. {text!r}" + (" (multi-turn; last user turn shown)" if multi else ""), ""]
            for point in (first, last):
                lines.append(f"- **w = ({point[0]:g}, {point[1]:g})**: {ours[chosen_id][point]['text']!r}")
            if chosen_id in base:
                lines.append(f"- **base model**: {base[chosen_id]['text']!r}")
    return "\n".join(lines) + "\n"
