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

from dataclasses import dataclass

import numpy as np
import torch

from .features import FeatureCache


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

    def margin(self, chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
        """``(n,)`` reward of the first reply minus the second's."""
        return ((chosen - rejected) / self.scale) @ self.weight


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


def relabel_with_teachers(
    cache: FeatureCache, train: dict, validation: dict, teacher_objectives, target_accuracy: float = 0.75, l2: float = 0.1
) -> tuple[dict, dict, dict]:
    """Give the other objectives' training pairs a label for each teacher objective.

    Args:
        train, validation: ``{objective: PairIndex}`` (human labels).
        teacher_objectives: the objectives whose teacher labels the other objectives' training pairs.

    Returns:
        ``train`` with each teacher objective's index extended by the relabelled pairs (chosen and rejected swapped
        where the teacher prefers the other reply), and a report: per teacher its validation accuracy, threshold,
        and per labelled objective the share of pairs kept and how often the teacher disagrees with the pair's own
        human label (the conflict rate: an upper bound on any trade-off learnable from the data); and the validation
        conflict pairs ``{(objective, teacher objective): PairIndex}``, oriented to the human label of ``objective``,
        that the teacher confidently labels the other way.
    """
    from .train import PairIndex  # the index type lives with the trainer

    def pooled(index):
        return (
            pooled_replies(cache, index.chosen, index.prompt_length),
            pooled_replies(cache, index.rejected, index.prompt_length),
        )

    unknown = [name for name in teacher_objectives if name not in train]
    if unknown:
        raise ValueError(f"teacher_objectives {unknown} are not training objectives {sorted(train)}")
    features = {name: pooled(index) for name, index in train.items()}
    val_features = {name: pooled(index) for name, index in validation.items()}
    extended, report, teachers = dict(train), {}, {}
    for teacher_name in teacher_objectives:
        teacher = fit_teacher(*features[teacher_name], l2=l2)
        val_margins = teacher.margin(*val_features[teacher_name])
        teacher.threshold = calibrate_threshold(val_margins, target_accuracy)
        confident = np.abs(val_margins) >= teacher.threshold
        entry = {
            "validation_accuracy": float((val_margins > 0).mean()),
            "validation_accuracy_kept": float((val_margins[confident] > 0).mean()),
            "validation_kept": float(confident.mean()),
            "threshold": teacher.threshold,
            "labels": {},
        }
        parts = [extended[teacher_name]]
        for other, index in train.items():
            if other == teacher_name:
                continue
            margins = teacher.margin(*features[other])
            keep = np.abs(margins) >= teacher.threshold
            agree = margins[keep] > 0
            parts.append(index.select(keep, swap=~(margins > 0)))  # oriented to the teacher's label
            entry["labels"][other] = {
                "pairs": int(len(margins)),
                "kept": int(keep.sum()),
                "disagree_with_human_label": float((~agree).mean()) if keep.any() else None,
                "disagree_all_pairs": float((margins < 0).mean()),
            }
        extended[teacher_name] = PairIndex.concat(parts)
        report[teacher_name] = entry
        teachers[teacher_name] = teacher
    conflicts = {}
    for teacher_name, teacher in teachers.items():
        for other, index in validation.items():
            if other == teacher_name:
                continue
            margins = teacher.margin(*val_features[other])
            keep = (np.abs(margins) >= teacher.threshold) & (margins < 0)  # confident, and against the human label
            conflicts[(other, teacher_name)] = index.select(keep)
            report[teacher_name]["labels"][other]["validation_conflicts"] = int(keep.sum())
    return extended, report, conflicts
