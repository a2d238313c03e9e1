"""Training losses as pure functions of tensors: next-token read-outs, ARM preference, gate entropy, PARM weights."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .files import is_int

ENTROPY_EPS = 1e-6


def _check_shapes(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must agree, got {shapes}")


def _masked_mean(name: str, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` ``(B, T)`` over the positions where ``mask`` is nonzero (every position when ``None``);
    ``name`` names ``values`` when the shapes disagree."""
    if mask is None:
        mask = torch.ones_like(values)
    _check_shapes(**{name: values, "mask": mask})
    mask = mask.to(values.dtype)  # (B, T)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _check_nonnegative(name: str, value: float) -> None:
    if not value >= 0:  # also rejects nan
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def next_token_targets(input_ids: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and mask for the logits at positions ``0 .. T-2``: ``(B, T)`` -> ``(B, T-1)`` long, ``(B, T-1)`` bool.

    The logits at position ``t`` predict token ``t + 1``, so labels and mask move one step left together.
    Callers that gather only some positions (the trainer scores response positions alone) use this too.
    """
    _check_shapes(input_ids=input_ids, response_mask=response_mask)
    labels = input_ids[:, 1:].long()  # (B, T-1)
    mask = response_mask[:, 1:].bool()  # (B, T-1)
    return labels, mask


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[label]`` without materialising the log-softmax: ``(..., V)``, ``(...)`` -> ``(...)``."""
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (...)
    return picked - torch.logsumexp(logits, dim=-1)  # (...)


def candidate_label_logprobs(
    base_logprobs: torch.Tensor, tail: torch.Tensor, shift: torch.Tensor, tail_shift: torch.Tensor | None = None
) -> torch.Tensor:
    """``log_softmax(z + Δ)[label]`` from the base log-probs of a few candidates, the label in column 0.

    ``z`` are the base logits over the whole vocabulary, of which only the candidates' log-probs are known:
    ``base_logprobs`` ``(N, C)`` and ``tail`` ``(N,)``, the log of the base probability of every other token.
    ``shift`` ``(N, C)`` is ``Δ`` at the candidates. ``tail_shift`` ``(N, S)`` is ``Δ`` at ``S`` tokens drawn from
    the base distribution restricted to the tail, which estimates the tail's share ``sum_tail pi(v) e^{Δ_v}`` as
    ``pi(tail) · mean_s e^{Δ_s}``; without it the tail keeps ``Δ = 0``. Then

        log_softmax(z + Δ)[y] = log pi(y) + Δ_y - log( sum_c pi(c) e^{Δ_c} + sum_tail pi(v) e^{Δ_v} )

    with no ``V``-wide tensor: exact when ``Δ`` is zero (or, with ``tail_shift``, constant) on the tail. Returns ``(N,)``.
    """
    _check_shapes(base_logprobs=base_logprobs, shift=shift)
    if base_logprobs.dim() != 2 or tail.shape != base_logprobs.shape[:1]:
        raise ValueError(f"base_logprobs must be (N, C) and tail (N,), got {tuple(base_logprobs.shape)} and {tuple(tail.shape)}")
    shifted = base_logprobs + shift  # (N, C)
    tail = tail.to(shifted.dtype)  # (N,)
    if tail_shift is not None:
        if tail_shift.dim() != 2 or tail_shift.shape[0] != shift.shape[0] or tail_shift.shape[1] < 1:
            raise ValueError(f"tail_shift must be (N, S) with S >= 1, got {tuple(tail_shift.shape)} for N = {shift.shape[0]}")
        tail = tail + tail_shift.logsumexp(-1) - math.log(tail_shift.shape[1])  # (N,) log(pi(tail) · mean_s e^{Δ_s})
    normaliser = torch.cat([shifted, tail[:, None]], dim=-1).logsumexp(-1)  # (N,)
    return shifted[:, 0] - normaliser  # (N,)


def arm_preference_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, beta_r: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The autoregressive-reward-model (GenARM) preference loss: ``mean(-log sigmoid(beta_r (R_c - R_r)))``.

    ``R`` is a response's sum (or mean) of log pi_r over its tokens (:func:`label_logprobs` at the
    :func:`next_token_targets`).

    Args:
        chosen_rewards, rejected_rewards: ``(B,)``.
        beta_r: scale of the reward difference, > 0.

    Returns:
        The scalar loss and detached stats named as trl names them: ``rewards/chosen``,
        ``rewards/rejected``, ``rewards/margins`` (batch means of R) and ``rewards/accuracies``
        (the fraction with R_c > R_r).
    """
    _check_shapes(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    if chosen_rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (B,), got {tuple(chosen_rewards.shape)}")
    if not beta_r > 0:
        raise ValueError(f"beta_r must be > 0, got {beta_r!r}")
    margins = chosen_rewards - rejected_rewards  # (B,)
    loss = -F.logsigmoid(beta_r * margins).mean()
    with torch.no_grad():
        stats = {
            "rewards/chosen": chosen_rewards.detach().mean(),
            "rewards/rejected": rejected_rewards.detach().mean(),
            "rewards/margins": margins.detach().mean(),
            "rewards/accuracies": (margins.detach() > 0).float().mean(),
        }
    return loss, stats


def gate_entropy(alpha: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean binary entropy ``H(a) = -a log a - (1 - a) log(1 - a)`` over the masked positions (nats).

    ``alpha`` is clamped to ``[eps, 1 - eps]`` so a saturated gate gives a finite value and gradient.
    The gate ``alpha_t`` fuses the logits at position ``t``, which predict token ``t + 1``: to
    average over the positions that generate the response, pass ``alpha[:, :-1]`` with the shifted
    mask :func:`next_token_targets` returns (``response_mask[:, 1:]``).

    Args:
        alpha: ``(B, T)`` gate values in ``[0, 1]``.
        mask: ``(B, T)``, nonzero where the entropy counts; ``None`` counts every position.
    """
    clamped = alpha.clamp(ENTROPY_EPS, 1.0 - ENTROPY_EPS)  # (B, T)
    entropy = -(clamped * clamped.log() + (1.0 - clamped) * (1.0 - clamped).log())  # (B, T)
    return _masked_mean("alpha", entropy, mask)


def gate_entropy_loss(alpha: torch.Tensor, mask: torch.Tensor | None = None, lambda_g: float = 0.01) -> torch.Tensor:
    """``L_alpha = -lambda_G * E_t[H(alpha_t)]``: rewards an undecided gate, so it does not saturate early."""
    _check_nonnegative("lambda_g", lambda_g)
    return -lambda_g * gate_entropy(alpha, mask)


def gate_logit_penalty(logits: torch.Tensor, mask: torch.Tensor | None = None, lambda_z: float = 0.0) -> torch.Tensor:
    """``lambda_Z * E_t[z_t ** 2]`` over the gate's pre-sigmoid values ``z_t`` (``alpha_t = sigmoid(z_t)``) at the masked
    positions: keeps the gate out of saturation, where its gradient vanishes.

    A preference-trained gate runs to alpha = 1 wherever guidance helps the training pairs; far out there the
    sigmoid's slope is ~0, Adam's normalised steps still move its weights, and a few steps against it can carry the
    gate to alpha = 0, where no gradient brings it back (a run of the shipped recipe with seed 1 ended with every
    answer the base model's). The entropy bonus of :func:`gate_entropy_loss` cannot stop this: its gradient vanishes
    at saturation too. This penalty's gradient grows with ``|z_t|`` (the z-loss that keeps mixture-of-experts routers
    stable, ST-MoE, arXiv 2202.08906). Arguments as :func:`gate_entropy`, ``logits`` in place of ``alpha``.
    """
    _check_nonnegative("lambda_z", lambda_z)
    return lambda_z * _masked_mean("logits", logits.square(), mask)


def multi_objective_loss(
    lm: torch.Tensor, pref_losses: torch.Tensor, weights: torch.Tensor, gate_loss: torch.Tensor, lambda_r: float = 1.0
) -> torch.Tensor:
    """``L = L_LM + lambda_R * sum_i w_i L_pref_i + L_alpha``.

    Args:
        lm: scalar mean negative log-likelihood of the fused logits over the response tokens.
        pref_losses: ``(k,)`` :func:`arm_preference_loss` per objective.
        weights: ``(k,)`` the preference the batch was trained under (a point of the simplex).
        gate_loss: scalar :func:`gate_entropy_loss` (already scaled by lambda_G).
        lambda_r: weight of the preference terms, >= 0.
    """
    _check_nonnegative("lambda_r", lambda_r)
    if pref_losses.dim() != 1:
        raise ValueError(f"pref_losses must have shape (k,), got {tuple(pref_losses.shape)}")
    _check_shapes(pref_losses=pref_losses, weights=weights)
    for name, value in (("lm", lm), ("gate_loss", gate_loss)):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a scalar tensor, got shape {tuple(value.shape)}")
    weighted = (weights.to(pref_losses.dtype) * pref_losses).sum()  # sum_i w_i L_pref_i
    return lm + lambda_r * weighted + gate_loss


def sample_preference(
    num_objectives: int, generator: torch.Generator | None = None, concentration: float | Sequence[float] = 1.0
) -> torch.Tensor:
    """A preference drawn from ``Dirichlet(concentration)`` (PARM): a ``(k,)`` point of the simplex.

    ``Dirichlet.sample`` takes no generator, so a seed is drawn from ``generator`` and the sample is
    taken under :func:`torch.random.fork_rng` seeded with it: the same generator state gives the same
    preference, and the global RNG is left as it was. With ``generator=None`` the global RNG is used.
    ``concentration=1`` is uniform over the simplex.
    """
    if not is_int(num_objectives, 1):
        raise ValueError(f"num_objectives must be a positive int, got {num_objectives!r}")
    concentration = torch.as_tensor(concentration, dtype=torch.float64)
    if concentration.dim() == 0:
        concentration = concentration.expand(num_objectives)  # (k,)
    if concentration.shape != (num_objectives,) or not bool((concentration > 0).all()):
        raise ValueError(f"concentration must be > 0, one value or {num_objectives}, got {concentration.tolist()}")
    dirichlet = torch.distributions.Dirichlet(concentration)
    if generator is None:
        sample = dirichlet.sample()
    else:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sample = dirichlet.sample()  # (k,)
    sample = sample.float()  # (k,)
    return sample / sample.sum()  # back on the simplex after the cast
