"""Teacher reward models: one Bradley-Terry probe per objective on mean-pooled frozen backbone states.

A teacher gives every training pair of the *other* objectives a label for its own objective, so a pair carries a
label per objective and the conflicts between objectives are in the data (PARM relabels PKU-SafeRLHF with a
helpfulness reward model and a harmlessness cost model the same way). A teacher never labels a pair it trained
on: it trains on its own objective's training pairs and labels the others'. Only labels whose margin clears a
threshold calibrated on the teacher's validation pairs are kept.

The features are the ones the Dual-Head trains on (the feature cache), mean-pooled over each reply's tokens, so a
teacher costs a few seconds on a CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .batches import OnPolicyGroup, PairIndex
from .features import FeatureCache
from .refusal import is_refusal

logger = logging.getLogger(__name__)


def pooled_replies(cache: FeatureCache, rows: np.ndarray, prompt_lengths: np.ndarray) -> np.ndarray:
    """``(n, d)`` float32: each sequence's hidden states averaged over its reply (the tokens after its prompt)."""
    pooled = np.zeros((len(rows), cache.hidden.shape[1]), dtype=np.float32)
    for i, (row, prompt_length) in enumerate(zip(rows, prompt_lengths)):
        _, states = cache.sequence(int(row))
        reply = states[int(prompt_length) :] if len(states) > prompt_length else states[-1:]
        pooled[i] = np.asarray(reply, dtype=np.float32).mean(axis=0)
    return pooled


@dataclass
class Teacher:
    """A linear Bradley-Terry reward on standardised pooled states: ``margin = ((c - r) / scale) · weight``."""

    weight: np.ndarray  # (d,)
    scale: np.ndarray  # (d,)
    threshold: float = 0.0  # |margin| at or above which a label is kept

    def reward(self, pooled: np.ndarray) -> np.ndarray:
        """``(n,)`` reward of each reply's pooled state ``(n, d)``."""
        return (pooled / self.scale) @ self.weight

    def margin(self, chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
        """``(n,)`` reward of the first reply minus the second's."""
        return self.reward(chosen - rejected)


def pair_features(cache: FeatureCache, indices: dict) -> dict:
    """``{objective: (chosen (n, d), rejected (n, d))}``: the pooled replies of each ``PairIndex``, read once and
    shared by fitting, relabelling and conflict counting."""
    return {
        name: (pooled_replies(cache, index.chosen, index.prompt_length), pooled_replies(cache, index.rejected, index.prompt_length))
        for name, index in indices.items()
    }


def fit_teacher(chosen: np.ndarray, rejected: np.ndarray, l2: float = 0.1, steps: int = 200) -> Teacher:
    """Fit ``min_w mean softplus(-(x_i · w)) + l2 · |w|²`` with ``x = (chosen - rejected) / scale`` (L-BFGS)."""
    if chosen.shape != rejected.shape or chosen.ndim != 2 or len(chosen) == 0:
        raise ValueError(f"chosen and rejected must be equal (n, d) arrays with n > 0, got {chosen.shape} and {rejected.shape}")
    scale = np.concatenate([chosen, rejected]).std(axis=0) + 1e-6  # (d,)
    x = torch.from_numpy((chosen - rejected) / scale).double()  # (n, d)
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.softplus(-(x @ weight)).mean() + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return Teacher(weight.detach().numpy().astype(np.float32), scale.astype(np.float32))


def calibrate_threshold(margins: np.ndarray, target_accuracy: float, min_kept: float = 0.1) -> float:
    """The smallest ``|margin|`` threshold at which the teacher's accuracy on human-labelled validation pairs
    (``margins`` > 0 is correct) reaches ``target_accuracy``, keeping at least ``min_kept`` of the pairs; the
    threshold that keeps the best-ranked ``min_kept`` when no threshold reaches it."""
    if not 0.5 <= target_accuracy <= 1:
        raise ValueError(f"target_accuracy must be in [0.5, 1], got {target_accuracy!r}")
    order = np.argsort(-np.abs(margins))
    correct = (margins[order] > 0).astype(np.float64)
    running = np.cumsum(correct) / np.arange(1, len(correct) + 1)  # accuracy of the k most confident
    smallest = max(1, int(np.ceil(min_kept * len(margins))))
    reach = [k for k in range(smallest, len(margins) + 1) if running[k - 1] >= target_accuracy]
    k = max(reach) if reach else smallest
    return float(np.abs(margins[order[k - 1]]))


def fit_teachers(features: dict, val_features: dict, names, target_accuracy: float, l2: float = 0.1) -> tuple[dict, dict]:
    """One teacher per objective in ``names``, fit on its human-labelled training pairs, its label threshold
    calibrated on its validation pairs (both as :func:`pair_features`). Returns ``({name: Teacher}, {name: report
    entry})``."""
    teachers, report = {}, {}
    for name in names:
        teacher = fit_teacher(*features[name], l2=l2)
        val_margins = teacher.margin(*val_features[name])
        teacher.threshold = calibrate_threshold(val_margins, target_accuracy)
        confident = np.abs(val_margins) >= teacher.threshold
        teachers[name] = teacher
        report[name] = {
            "validation_accuracy": float((val_margins > 0).mean()),
            "validation_accuracy_kept": float((val_margins[confident] > 0).mean()),
            "validation_kept": float(confident.mean()),
            "threshold": teacher.threshold,
            "labels": {},
        }
    return teachers, report


def label_onpolicy(
    cache: FeatureCache,
    teachers: dict,
    groups: list[OnPolicyGroup],
    sources: dict | None = None,
    label_with: dict | None = None,
    rules: list[dict] | None = None,
) -> tuple[dict, dict, dict]:
    """Every pair of distinct replies of a prompt, labelled by each objective's teacher where it is confident.

    Args:
        teachers: ``{objective: Teacher}`` with calibrated thresholds (:func:`fit_teachers`).
        sources: ``{objective: [prompt sources]}``: that objective's teacher labels the pairs of these prompts only
            (a harmlessness teacher trained on red-team dialogues prefers a refusal even to a harmless question, so
            its labels carry harm only where the prompt can be harmful); an objective not named labels all prompts.
        label_with: ``{objective: {prompt source: teacher objective}}``: another objective's teacher labels this
            objective's pairs of these prompts (e.g. on benign prompts, where both replies are harmless, the
            helpfulness teacher's label says that declining is not the harmless choice); default: its own teacher.
        rules: labels by construction, instead of a teacher's: each ``{"objectives": [...], "sources": [...],
            "prefer": folder, "over": folder}`` says that, for those objectives and prompts of those sources, a reply
            sampled into ``prefer`` beats one sampled into ``over`` (e.g. on benign prompts a free reply beats one
            sampled from a declining opening); such pairs always carry the rule's label. An optional ``"refuses":
            "prefer"`` (or ``"over"``) narrows a rule to the pairs where the keyword refusal detector
            (:func:`paretoalign.refusal.is_refusal`) says that reply declines and the other does not, so a
            declining opening that went on to comply, or a free reply that declined, is not labelled by its folder.

    Returns:
        ``{objective: PairIndex}`` of the pairs oriented to that teacher's label; the replies' teacher rewards
        ``{objective: (R,) array}`` (for the data file); and a report per prompt source: pairs, kept per objective,
        and among pairs both teachers label, the share they label opposite ways (the conflicts a trade-off needs).
    """

    sources, label_with = sources or {}, label_with or {}
    rows = np.concatenate([group.rows for group in groups]) if groups else np.zeros(0, dtype=np.int64)
    lengths = np.concatenate([np.full(len(group.rows), group.prompt_length) for group in groups]) if groups else rows
    pooled = pooled_replies(cache, rows, lengths)  # (R, d)
    rewards = {name: teacher.reward(pooled) for name, teacher in teachers.items()}  # (R,) each
    first, second, prompt_length, source, folders = [], [], [], [], []
    start = 0
    for group in groups:
        for i in range(len(group.rows)):
            for j in range(i + 1, len(group.rows)):
                if group.texts[i].strip() != group.texts[j].strip():
                    first.append(start + i)
                    second.append(start + j)
                    prompt_length.append(group.prompt_length)
                    source.append(group.source)
                    folders.append((Path(group.folders[i]), Path(group.folders[j])) if group.folders else (None, None))
        start += len(group.rows)
    first, second, prompt_length = np.array(first, dtype=np.int64), np.array(second, dtype=np.int64), np.array(prompt_length)
    source = np.array(source, dtype=object)
    ruled = {name: np.zeros(len(first)) for name in teachers}  # (pairs,) per objective: +1 / -1 by a rule, 0: none
    refused = None
    for rule in rules or []:
        prefer, over = Path(rule["prefer"]), Path(rule["over"])
        where = np.array([pair in ((prefer, over), (over, prefer)) for pair in folders], dtype=bool)
        where &= np.isin(source, rule["sources"])
        sign = np.array([1.0 if a == prefer else -1.0 for a, _ in folders]) if folders else np.zeros(0)
        if rule.get("refuses"):
            if refused is None:  # (R,) the detector's verdict on every reply
                refused = np.array([is_refusal(text) for group in groups for text in group.texts], dtype=bool)
            preferred, other = np.where(sign > 0, first, second), np.where(sign > 0, second, first)
            declining, complying = (preferred, other) if rule["refuses"] == "prefer" else (other, preferred)
            where &= refused[declining] & ~refused[complying]
        if not where.any():
            logger.warning(
                "on-policy rule %s labels no pair: no prompt of those sources has replies in both folders%s",
                rule, " that the refusal detector tells apart" if rule.get("refuses") else "",
            )
        for name in rule["objectives"]:
            ruled[name] = np.where(where, sign, ruled[name])
    labelled, labels = {}, {}
    margins = {name: rewards[name][first] - rewards[name][second] for name in teachers}  # (pairs,) per teacher
    for name in teachers:
        judge = np.array([label_with.get(name, {}).get(str(s), name) for s in source], dtype=object)  # (pairs,)
        margin, threshold = np.zeros(len(first)), np.zeros(len(first))
        for teacher_name in set(judge):
            mine = judge == teacher_name
            margin[mine], threshold[mine] = margins[teacher_name][mine], teachers[teacher_name].threshold
        allowed = np.isin(source, sources[name]) if name in sources else np.ones(len(first), dtype=bool)
        margin = np.where(ruled[name] != 0, ruled[name], margin)
        keep = (ruled[name] != 0) | (allowed & (np.abs(margin) >= threshold))
        labels[name] = np.where(keep, np.sign(margin), 0)  # +1: the first reply wins, -1: the second, 0: no label
        swap = margin < 0
        labelled[name] = PairIndex(
            rows[np.where(swap, second, first)][keep], rows[np.where(swap, first, second)][keep], prompt_length[keep]
        )
    report = {}
    names = list(teachers)
    for value in sorted({str(s) for s in source}):
        mine = source.astype(str) == value
        entry = {"prompts": int(sum(str(g.source) == value for g in groups)), "pairs": int(mine.sum())}
        for name in names:
            entry[f"kept_{name}"] = int((labels[name][mine] != 0).sum())
            if rules:
                entry[f"by_rule_{name}"] = int((ruled[name][mine] != 0).sum())
        if len(names) == 2:
            both = mine & (labels[names[0]] != 0) & (labels[names[1]] != 0)
            entry["both_labelled"] = int(both.sum())
            entry["disagree"] = float((labels[names[0]][both] != labels[names[1]][both]).mean()) if both.any() else None
        report[value] = entry
    return labelled, rewards, report


def relabel_with_teachers(
    train: dict, validation: dict, features: dict, val_features: dict, teachers: dict, report: dict, relabel=None
) -> tuple[dict, dict]:
    """Give the other objectives' training pairs a label for each teacher in ``relabel`` (default: all).

    Args:
        train, validation: ``{objective: PairIndex}`` (human labels); ``features``, ``val_features``: their pooled
            replies (:func:`pair_features`).
        teachers, report: from :func:`fit_teachers`; ``report`` gains, per teacher and labelled objective, the
            pairs kept and how often the teacher disagrees with the pair's own human label (the conflict rate: an
            upper bound on any trade-off learnable from the data).

    Returns:
        ``train`` with each relabelling teacher's index extended by the relabelled pairs (chosen and rejected
        swapped where the teacher prefers the other reply), and the validation conflict pairs ``{(objective,
        teacher objective): PairIndex}`` of every teacher, oriented to the human label of ``objective``, that the
        teacher confidently labels the other way.
    """

    relabel = list(teachers) if relabel is None else list(relabel)
    unknown = [name for name in relabel if name not in teachers]
    if unknown:
        raise ValueError(f"teacher_objectives {unknown} have no teacher; teachers: {sorted(teachers)}")
    extended = dict(train)
    for teacher_name in relabel:
        teacher, entry = teachers[teacher_name], report[teacher_name]
        parts = [extended[teacher_name]]
        for other in train:
            if other == teacher_name:
                continue
            margins = teacher.margin(*features[other])
            keep = np.abs(margins) >= teacher.threshold
            agree = margins[keep] > 0
            parts.append(train[other].select(keep, swap=~(margins > 0)))  # oriented to the teacher's label
            entry["labels"][other] = {
                "pairs": int(len(margins)),
                "kept": int(keep.sum()),
                "disagree_with_human_label": float((~agree).mean()) if keep.any() else None,
                "disagree_all_pairs": float((margins < 0).mean()),
            }
        extended[teacher_name] = PairIndex.concat(parts)
    conflicts = {}
    for teacher_name, teacher in teachers.items():
        for other, index in validation.items():
            if other == teacher_name:
                continue
            margins = teacher.margin(*val_features[other])
            keep = (np.abs(margins) >= teacher.threshold) & (margins < 0)  # confident, and against the human label
            conflicts[(other, teacher_name)] = index.select(keep)
            report[teacher_name]["labels"].setdefault(other, {})["validation_conflicts"] = int(keep.sum())
    return extended, conflicts
