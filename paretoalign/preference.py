"""Preference vectors, the one place they are parsed and checked: text, sliders and weights to a point of the simplex,
validation (at the edges: where a preference comes in, not in every layer call), reordering, batching and grids."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

DEFAULT_OBJECTIVES: tuple[str, ...] = ("helpfulness", "harmlessness")
SIMPLEX_TOLERANCE = 1e-4


def parse_objectives(text: str | Sequence[str]) -> tuple[str, ...]:
    """Parse ``"helpfulness,harmlessness"`` (or a sequence of names) into a tuple of names."""
    names = [name.strip() for name in text.split(",")] if isinstance(text, str) else [str(n).strip() for n in text]
    if not names or any(not name for name in names):
        raise ValueError(f"objectives must be non-empty comma-separated names, got {text!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"objectives must not repeat a name, got {text!r}")
    return tuple(names)


def parse_preference(text: str | Sequence[float] | Mapping[str, float], objectives: Sequence[str] | None = None) -> list[float]:
    """Turn ``"0.2,0.8"``, ``[0.2, 0.8]`` or ``{"helpfulness": 0.2, ...}`` into a validated weight list.

    A mapping is ordered by ``objectives`` (every objective must be present). The result is
    checked with :func:`validate_preference`.
    """
    if isinstance(text, Mapping):
        if objectives is None:
            raise ValueError("preference given as a mapping needs the list of objectives to order it")
        unknown = set(text) - set(objectives)
        missing = [name for name in objectives if name not in text]
        if unknown or missing:
            raise ValueError(
                f"preference {dict(text)!r} does not match objectives {list(objectives)!r} "
                f"(unknown: {sorted(unknown)}, missing: {missing})"
            )
        values = [text[name] for name in objectives]
    elif isinstance(text, str):
        try:
            values = [float(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(f"preference must be comma-separated numbers such as '0.2,0.8', got {text!r}") from None
    else:
        values = [float(v) for v in text]
    num_objectives = len(objectives) if objectives is not None else None
    validate_preference(torch.tensor(values, dtype=torch.float64), num_objectives)
    return values


def finite_number(value, name: str) -> float:
    """``float(value)``, or a ``ValueError`` naming ``name`` and the value when it is no finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def preference_from_weights(weights: Sequence[float], objectives: Sequence[str]) -> list[float]:
    """Weights (any non-negative numbers, one per objective) normalised onto the simplex.

    Example:
        >>> preference_from_weights([1, 1, 2], ["helpfulness", "harmlessness", "honesty"])
        [0.25, 0.25, 0.5]
    """
    weights = list(weights)
    if len(weights) != len(objectives):
        raise ValueError(f"got {len(weights)} weights for the {len(objectives)} objectives {', '.join(objectives)}")
    values = [finite_number(w, f"the {name} weight") for w, name in zip(weights, objectives)]
    if any(v < 0 for v in values):
        raise ValueError(f"weights must be non-negative, got {values}")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"at least one objective needs a weight above 0, got {values}")
    return [v / total for v in values]


def preference_from_sliders(values: Sequence[float], objectives: Sequence[str]) -> list[float]:
    """The preference the app's sliders mean.

    With two objectives there is one slider: the weight of the second objective, the first getting 1 − it
    (``[0.7]`` -> ``[0.3, 0.7]``). With more, one slider per objective, normalised onto the simplex.
    """
    values = list(values)
    if len(objectives) == 2 and len(values) == 1:
        second = finite_number(values[0], f"the {objectives[1]} weight")
        if not 0.0 <= second <= 1.0:
            raise ValueError(f"the {objectives[1]} weight must lie in [0, 1], got {second}")
        return [1.0 - second, second]
    return preference_from_weights(values, objectives)


def parse_weights(text, objectives: Sequence[str], name: str = "preference") -> list[float]:
    """``"1, 0"``, ``"[0.5, 0.5]"`` or a list of numbers -> a preference on the simplex (weights are normalised)."""
    if isinstance(text, str):
        parts = [part.strip() for part in text.strip().strip("[]()").split(",")]
        if not any(parts):
            raise ValueError(f"{name} is empty: give one weight per objective ({', '.join(objectives)}), such as '0.5, 0.5'")
        try:
            values = [float(part) for part in parts]
        except ValueError:
            raise ValueError(
                f"{name} must be comma-separated numbers, one per objective ({', '.join(objectives)}), got {text!r}"
            ) from None
    elif isinstance(text, Sequence):
        values = list(text)
    else:
        raise TypeError(f"{name} must be comma-separated numbers or a list, got {text!r}")
    try:
        return preference_from_weights(values, objectives)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def reorder_preference(weights: Sequence[float], objectives: Sequence[str], order: Sequence[str]) -> list[float]:
    """Weights given for ``objectives`` in the order ``order`` (a model's objectives)."""
    if set(objectives) != set(order) or len(objectives) != len(order):
        raise ValueError(f"--objectives {list(objectives)} do not match the model's objectives {list(order)}")
    by_name = dict(zip(objectives, weights))
    return [by_name[name] for name in order]


def validate_preference(preference: torch.Tensor, num_objectives: int | None) -> None:
    """Raise ``ValueError`` unless every row is a point of the probability simplex.

    Args:
        preference: ``(k,)`` or ``(batch, k)`` weights.
        num_objectives: the expected ``k`` (``None`` skips the length check).
    """
    if not torch.is_tensor(preference):
        raise TypeError(f"preference must be a tensor, got {type(preference).__name__}")
    if preference.dim() not in (1, 2) or preference.shape[-1] == 0:
        raise ValueError(f"preference must have shape (k,) or (batch, k), got shape {tuple(preference.shape)}")
    values = preference.detach().to(torch.float64)

    def shown():  # formatted only when raising: this check runs on every decoding step
        return _rounded(values.tolist())

    if num_objectives is not None and values.shape[-1] != num_objectives:
        raise ValueError(f"preference {shown()} has {values.shape[-1]} weights but there are {num_objectives} objectives")
    if not torch.isfinite(values).all():
        raise ValueError(f"preference {shown()} must hold finite numbers")
    if (values < 0).any():
        raise ValueError(f"preference {shown()} must be non-negative")
    sums = values.sum(-1)
    if ((sums - 1.0).abs() > SIMPLEX_TOLERANCE).any():
        raise ValueError(f"preference {shown()} must sum to 1 (within {SIMPLEX_TOLERANCE}), sums are {_rounded(sums.tolist())}")


def _rounded(values):
    """Values as a person typed them: float32 noise (0.699999988) rounded away."""
    if isinstance(values, list):
        return [_rounded(v) for v in values]
    return float(f"{values:.6g}")


def preference_batch(
    preference: torch.Tensor | Sequence[float] | Sequence[Sequence[float]],
    batch_size: int,
    num_objectives: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Validate ``preference`` and expand it to one row per batch element: ``(batch_size, k)``."""
    tensor = torch.as_tensor(preference, dtype=torch.float64)
    validate_preference(tensor, num_objectives)
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0).expand(batch_size, -1)  # (B, k)
    elif tensor.shape[0] == 1:
        tensor = tensor.expand(batch_size, -1)  # (B, k)
    elif tensor.shape[0] != batch_size:
        raise ValueError(f"preference has {tensor.shape[0]} rows but the batch has {batch_size}")
    return tensor.to(device=device, dtype=dtype)


def simplex_grid(num_points: int, num_objectives: int = 2) -> list[tuple[float, ...]]:
    """Evenly spaced points of the simplex: ``num_points`` per edge (11 gives (0,1), (0.1,0.9), ...)."""
    if num_points < 2:
        raise ValueError(f"num_points must be at least 2, got {num_points}")
    if num_objectives < 1:
        raise ValueError(f"num_objectives must be at least 1, got {num_objectives}")
    steps = num_points - 1

    def compositions(total: int, parts: int):
        if parts == 1:
            yield (total,)
            return
        for first in range(total, -1, -1):
            for rest in compositions(total - first, parts - 1):
                yield (first, *rest)

    points = [tuple(round(c / steps, 10) for c in comp) for comp in compositions(steps, num_objectives)]
    return sorted(points)
