"""Pareto-front metrics for comparing multi-objective decoding methods: hypervolume (HV) and mean inner product (MIP).

Every objective here is a REWARD to MAXIMISE. A set of points is an array-like of shape
``(n_points, n_objectives)``; a single 1-D point ``(n_objectives,)`` is read as one row.

The PARM paper reports HV and MIP but ships no code for them, and its reference point and
normalisation cannot be recovered. The convention used here, recorded by :func:`front_summary`:

1. ``lower, upper = normalization_bounds({method: mean_rewards, ...})`` over the union of all
   methods' points, so every method is normalised identically;
2. ``normalize(rewards, lower, upper)`` maps each objective to ``[0, 1]``;
3. HV is measured in that normalised space from the reference point ``0`` (the lower bounds),
   and MIP is the mean of ``<w_j, r_j>`` over the preference grid.

HV is delegated to pymoo (``pymoo.indicators.hv.HV``), which minimises; points and reference
are negated before the call.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pymoo.indicators.hv import HV

SIMPLEX_ATOL = 1e-6


def _as_points(name: str, points, n_objectives: int | None = None) -> np.ndarray:
    """Validate and return ``points`` as a float array ``(n_points, n_objectives)``.

    A 1-D input is one point; an empty input (``[]`` or ``(0, k)``) is the empty set.
    """
    array = np.asarray(points, dtype=float)
    if array.ndim == 1:
        # [] is the empty set, not one point with zero objectives
        array = array.reshape(0, n_objectives or 0) if array.size == 0 else array[None, :]  # (1, k)
    if array.ndim != 2:
        raise ValueError(f"{name} must have shape (n_points, n_objectives) or (n_objectives,), got shape {array.shape}")
    if array.shape[0] == 0 and array.shape[1] == 0 and n_objectives:
        array = array.reshape(0, n_objectives)
    if array.shape[0] > 0 and array.shape[1] == 0:
        raise ValueError(f"{name} must have at least one objective, got shape {array.shape}")
    if n_objectives is not None and array.shape[1] != n_objectives:
        raise ValueError(f"{name} must have {n_objectives} objectives per point, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        bad = array[~np.all(np.isfinite(array), axis=1)]
        raise ValueError(f"{name} must be finite, got rows {bad.tolist()}")
    return array


def _as_vector(name: str, vector, n_objectives: int | None = None) -> np.ndarray:
    """Validate and return ``vector`` as a finite, non-empty float array ``(n_objectives,)``."""
    array = np.asarray(vector, dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must have shape (n_objectives,), got shape {array.shape}: {array.tolist()}")
    if n_objectives is not None and array.size != n_objectives:
        raise ValueError(f"{name} must have {n_objectives} entries, got {array.tolist()}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {array.tolist()}")
    return array


def _check_bounds(lower: np.ndarray, upper: np.ndarray) -> None:
    flat = ~(upper > lower)  # (k,)
    if np.any(flat):
        objectives = np.flatnonzero(flat).tolist()
        raise ValueError(
            f"upper must be > lower in every objective, got lower={lower.tolist()} upper={upper.tolist()} "
            f"(objectives {objectives})"
        )


def hypervolume(points, reference) -> float:
    """Volume dominated by ``points`` and bounded below by ``reference``; objectives are rewards to MAXIMISE.

    Args:
        points: ``(n_points, n_objectives)`` rewards, or one point ``(n_objectives,)``. May be empty.
        reference: ``(n_objectives,)`` reference point (required; there is no sensible default).
            Only points strictly better than it in every objective contribute.

    Returns:
        The hypervolume, ``0.0`` for an empty set or when no point strictly dominates ``reference``.

    Example: ``hypervolume([[1, 3], [2, 2], [3, 1]], reference=[0, 0]) == 6.0``.
    """
    reference = _as_vector("reference", reference)  # (k,)
    points = _as_points("points", points, n_objectives=reference.size)  # (n, k)
    # Points with any coordinate <= reference bound zero volume. pymoo/moocore already return 0 for them,
    # but filtering here keeps the result independent of that backend detail.
    points = points[np.all(points > reference, axis=1)]  # (m, k)
    if len(points) == 0:
        return 0.0
    # pymoo minimises: maximising r from reference is minimising -r up to -reference.
    indicator = HV(ref_point=-reference, norm_ref_point=False)
    return float(indicator(-points))


def normalize(points, lower, upper) -> np.ndarray:
    """Min-max normalise each objective (a reward to MAXIMISE) to ``[0, 1]``: ``(points - lower) / (upper - lower)``.

    Args:
        points: ``(n_points, n_objectives)`` or one point ``(n_objectives,)``; the output has the same shape.
        lower, upper: ``(n_objectives,)`` explicit bounds, e.g. from :func:`normalization_bounds`;
            ``upper > lower`` in every objective.

    Values outside ``[lower, upper]`` are not clipped: they map outside ``[0, 1]``.
    """
    lower = _as_vector("lower", lower)  # (k,)
    upper = _as_vector("upper", upper, n_objectives=lower.size)  # (k,)
    _check_bounds(lower, upper)
    is_single_point = np.ndim(points) == 1 and np.size(points) > 0
    array = _as_points("points", points, n_objectives=lower.size)  # (n, k)
    normalized = (array - lower) / (upper - lower)  # (n, k)
    return normalized[0] if is_single_point else normalized


def normalization_bounds(points_by_method: Mapping[str, object], margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-objective ``(lower, upper)`` over the union of all methods' points (rewards to MAXIMISE).

    Normalising every method with the same bounds keeps their HV and MIP comparable.

    Args:
        points_by_method: method name -> ``(n_points, n_objectives)`` rewards (or one 1-D point).
        margin: widen both bounds by ``margin * (max - min)`` per objective. With ``margin=0`` the
            worst point in each objective lands on the default HV reference and contributes no volume.

    Returns:
        ``(lower, upper)``, each ``(n_objectives,)``.

    Raises:
        ValueError: if no points are given, methods disagree on ``n_objectives``, or an objective
            has the same value everywhere (it cannot be normalised).
    """
    if not isinstance(points_by_method, Mapping):
        raise TypeError(f"points_by_method must be a mapping of method name -> points, got {type(points_by_method).__name__}")
    if not (np.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    arrays = {name: _as_points(f"points_by_method[{name!r}]", points) for name, points in points_by_method.items()}
    arrays = {name: array for name, array in arrays.items() if len(array) > 0}
    if not arrays:
        raise ValueError(f"points_by_method must contain at least one point, got methods {list(points_by_method)}")
    n_objectives = {name: array.shape[1] for name, array in arrays.items()}
    if len(set(n_objectives.values())) != 1:
        raise ValueError(f"all methods must have the same number of objectives, got {n_objectives}")
    union = np.concatenate(list(arrays.values()), axis=0)  # (N, k)
    lower, upper = union.min(axis=0), union.max(axis=0)  # (k,), (k,)
    if np.any(upper == lower):
        constant = {int(i): float(lower[i]) for i in np.flatnonzero(upper == lower)}
        raise ValueError(f"cannot normalise objectives with the same value for every point, got {{objective: value}} {constant}")
    span = upper - lower  # (k,)
    return lower - margin * span, upper + margin * span


def mean_inner_product(preferences, rewards) -> float:
    """MIP: mean over grid points ``j`` of ``<w_j, r_j>``; objectives are rewards to MAXIMISE.

    Args:
        preferences: ``(n_points, n_objectives)`` preference weights ``w_j``, each row on the simplex
            (non-negative, summing to 1), or one 1-D preference.
        rewards: ``(n_points, n_objectives)`` (normalised) mean rewards ``r_j`` obtained when decoding at ``w_j``.

    Example: preferences ``(1, 0), (0.5, 0.5), (0, 1)`` with rewards ``(0.8, 0.1), (0.5, 0.5), (0.2, 0.9)``
    give ``(0.8 + 0.5 + 0.9) / 3``.
    """
    preferences = _as_points("preferences", preferences)  # (n, k)
    rewards = _as_points("rewards", rewards, n_objectives=preferences.shape[1] or None)  # (n, k)
    if preferences.shape != rewards.shape:
        raise ValueError(f"preferences and rewards must have the same shape, got {preferences.shape} and {rewards.shape}")
    if len(preferences) == 0:
        raise ValueError("mean_inner_product needs at least one (preference, reward) pair, got 0")
    off_simplex = np.any(preferences < 0, axis=1) | ~np.isclose(preferences.sum(axis=1), 1.0, rtol=0, atol=SIMPLEX_ATOL)
    if np.any(off_simplex):
        raise ValueError(f"each preference must be non-negative and sum to 1, got rows {preferences[off_simplex].tolist()}")
    return float(np.mean(np.sum(preferences * rewards, axis=1)))


def pareto_mask(points) -> np.ndarray:
    """Boolean mask ``(n_points,)`` of non-dominated points, objectives being rewards to MAXIMISE.

    ``a`` dominates ``b`` when ``a >= b`` everywhere and ``a > b`` somewhere, so duplicates of a
    non-dominated point are all kept. A 1-D point gives ``[True]``; an empty set gives an empty mask.
    Delegated to pymoo's non-dominated sorting (which minimises: it sorts the negated rewards).
    """
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    points = _as_points("points", points)  # (n, k)
    mask = np.zeros(len(points), dtype=bool)  # (n,)
    if len(points):
        mask[NonDominatedSorting().do(-points, only_non_dominated_front=True)] = True
    return mask


def front_summary(preferences, rewards, lower, upper, reference=None) -> dict:
    """HV and MIP of one method's front, with everything needed to reproduce them; rewards are MAXIMISED.

    Args:
        preferences: ``(n_points, n_objectives)`` preferences on the simplex.
        rewards: ``(n_points, n_objectives)`` raw mean rewards at those preferences.
        lower, upper: ``(n_objectives,)`` normalisation bounds shared by all compared methods
            (see :func:`normalization_bounds`).
        reference: ``(n_objectives,)`` HV reference point in the NORMALISED space; default the
            origin, i.e. the lower bounds in raw reward units.

    Returns:
        JSON-serialisable dict: ``hv`` and ``mip`` (both on normalised rewards), ``n_points``,
        ``lower``, ``upper`` (raw units) and ``reference`` (normalised units).
    """
    normalized = normalize(_as_points("rewards", rewards), lower, upper)  # (n, k)
    n_objectives = normalized.shape[1]
    reference = np.zeros(n_objectives) if reference is None else _as_vector("reference", reference, n_objectives)  # (k,)
    return {
        "hv": hypervolume(normalized, reference),
        "mip": mean_inner_product(preferences, normalized),
        "n_points": int(len(normalized)),
        "lower": np.asarray(lower, dtype=float).tolist(),
        "upper": np.asarray(upper, dtype=float).tolist(),
        "reference": reference.tolist(),
    }
