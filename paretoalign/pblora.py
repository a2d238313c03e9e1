"""PBLoRA: preference-aware bilinear low-rank adaptation of a frozen ``nn.Linear`` (PARM).

The adapted weight for a preference ``w`` over ``k`` objectives is

    W(w) = W0 + s · B · blockdiag(W1, W2(w)) · A,    W2(w) = reshape(Linear_k→r2²(w)),  s = lora_alpha / r2

with ``A`` of shape ``(r1 + r2, in)``, ``B`` of shape ``(out, r1 + r2)``. ``W1`` (r1×r1) is shared by all
preferences; ``W2(w)`` (r2×r2) depends on the preference linearly. ``B`` starts at zero so a fresh
adapter reproduces the base layer exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .files import check_positive_int, is_int
from .preference import validate_preference


@dataclass
class PBLoRAConfig:
    """Hyper-parameters of one family of PBLoRA adapters."""

    r1: int = field(default=4, metadata={"help": "rank of the preference-agnostic block W1 (0 disables it)"})
    r2: int = field(default=8, metadata={"help": "rank of the preference-aware block W2(w); at least 1"})
    lora_alpha: float = field(default=8.0, metadata={"help": "scaling numerator: s = lora_alpha / r2"})

    def __post_init__(self):
        if not is_int(self.r1, 0):
            raise ValueError(f"r1 must be an integer >= 0, got {self.r1!r}")
        if not is_int(self.r2, 1):
            raise ValueError(f"r2 must be an integer >= 1 (the preference needs a block), got {self.r2!r}")
        if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class PBLoRALinear(nn.Module):
    """Wrap a frozen ``nn.Linear`` with a preference-conditioned low-rank update.

    ``forward(x, preference)`` computes ``base(x) + s · B · blockdiag(W1, W2(w)) · A · x`` without ever
    forming the ``out × in`` update.

    Example:
        >>> layer = PBLoRALinear(nn.Linear(16, 32), r1=2, r2=4, num_objectives=2)
        >>> layer(torch.randn(3, 5, 16), torch.tensor([[1.0, 0.0]] * 3)).shape
        torch.Size([3, 5, 32])
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r1: int = 4,
        r2: int = 8,
        num_objectives: int = 2,
        lora_alpha: float = 8.0,
        freeze_base: bool = True,
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        check_positive_int("num_objectives", num_objectives)
        self.config = PBLoRAConfig(r1=r1, r2=r2, lora_alpha=float(lora_alpha))
        self.base_layer = base_layer
        if freeze_base:
            for parameter in base_layer.parameters():
                parameter.requires_grad_(False)
        self.r1, self.r2, self.num_objectives = r1, r2, num_objectives
        self.scaling = self.config.lora_alpha / r2
        rank = r1 + r2
        # Like peft's autocast_adapter_dtype: adapters over a 16-bit base are kept in float32.
        base_dtype = base_layer.weight.dtype
        adapter_dtype = torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
        factory = {"device": base_layer.weight.device, "dtype": adapter_dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, rank, **factory))
        self.lora_W1 = nn.Parameter(torch.empty(r1, r1, **factory))
        # W2(w) = Linear(w): a bias-free map from k weights to an r2 x r2 matrix.
        self.lora_W2 = nn.Linear(num_objectives, r2 * r2, bias=False, **factory)
        self._merged_preference: torch.Tensor | None = None
        self._unmerged_weight: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.r1:
            nn.init.eye_(self.lora_W1)
        # Each one-hot preference starts near the identity, so every objective's block begins as plain LoRA.
        with torch.no_grad():
            eye = torch.eye(self.r2, device=self.lora_A.device, dtype=self.lora_A.dtype).reshape(-1, 1)
            noise = torch.randn(self.r2 * self.r2, self.num_objectives, device=eye.device, dtype=eye.dtype)
            self.lora_W2.weight.copy_(eye + noise / self.r2)

    @property
    def merged(self) -> bool:
        return self._merged_preference is not None

    def _check_preference(self, preference: torch.Tensor, full: bool = True) -> torch.Tensor:
        """The preference on the adapter's device and dtype. ``full`` checks that each row lies on the simplex (an
        entry point: :meth:`forward`, :meth:`merge`); the inner methods a model calls per token with a preference it
        validated where it came in check the number of weights only, which needs no device sync."""
        if not torch.is_tensor(preference):
            preference = torch.as_tensor(preference, dtype=torch.float32)
        if full:
            validate_preference(preference, self.num_objectives)
        elif preference.dim() not in (1, 2) or preference.shape[-1] != self.num_objectives:
            raise ValueError(f"preference must have shape (k,) or (batch, k) with k = {self.num_objectives}, got shape {tuple(preference.shape)}")
        return preference.to(device=self.lora_A.device, dtype=self.lora_A.dtype)

    def preference_block(self, preference: torch.Tensor) -> torch.Tensor:
        """W2(w): ``(k,) -> (r2, r2)`` or ``(B, k) -> (B, r2, r2)``."""
        return self.lora_W2(preference).unflatten(-1, (self.r2, self.r2))

    def adapter_output(self, x: torch.Tensor, preference: torch.Tensor) -> torch.Tensor:
        """The update alone, ``s · B · blockdiag(W1, W2(w)) · A · x``, shaped like ``base(x)``.

        Args:
            x: ``(..., in)``; with a ``(B, k)`` preference the leading dimension of ``x`` must be ``B``.
            preference: ``(k,)`` shared by all rows, or ``(B, k)`` one per row, already validated by the caller
                (:func:`~paretoalign.preference.validate_preference`; only its shape is checked here).
        """
        return self.scaling * (self.mixed_input(x, preference) @ self.lora_B.T)  # (..., out)

    def adapter_output_rows(self, x: torch.Tensor, preference: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The update at some outputs only: ``(N, in)``, ``(N, k)`` or ``(k,)``, ``(N, C)`` ids -> ``(N, C)``.

        ``adapter_output(x, preference).gather(-1, rows)`` without the ``(N, out)`` product: a vocabulary-sized
        layer scored at a few candidate tokens per position costs ``C`` rows of ``B``, not ``out``.
        """
        if x.dim() != 2 or rows.dim() != 2 or rows.shape[0] != x.shape[0]:
            raise ValueError(f"x must be (N, in) and rows (N, C), got {tuple(x.shape)} and {tuple(rows.shape)}")
        mixed = self.mixed_input(x, preference)  # (N, r1 + r2)
        return self.scaling * torch.einsum("nr,ncr->nc", mixed, self.lora_B[rows])  # (N, C)

    def mixed_input(self, x: torch.Tensor, preference: torch.Tensor) -> torch.Tensor:
        """``blockdiag(W1, W2(w)) · A · x``, the update before ``B``: ``(..., in) -> (..., r1 + r2)``."""
        preference = self._check_preference(preference, full=False)
        low = x.to(self.lora_A.dtype) @ self.lora_A.T  # (..., r1 + r2)
        shared, aware = low[..., : self.r1], low[..., self.r1 :]  # (..., r1), (..., r2)
        block = self.preference_block(preference)  # (r2, r2) or (B, r2, r2)
        if preference.dim() == 1:
            aware = aware @ block.T  # (..., r2)
        else:
            if x.shape[0] != preference.shape[0]:
                raise ValueError(f"preference has {preference.shape[0]} rows but the input batch has {x.shape[0]}")
            flat = aware.reshape(aware.shape[0], -1, self.r2)  # (B, N, r2)
            aware = torch.bmm(flat, block.transpose(1, 2)).reshape(aware.shape)  # (..., r2)
        return torch.cat([shared @ self.lora_W1.T, aware], dim=-1) if self.r1 else aware  # (..., r1 + r2)

    def forward(self, x: torch.Tensor, preference: torch.Tensor) -> torch.Tensor:
        return self.forward_checked(x, self._check_preference(preference))

    def forward_checked(self, x: torch.Tensor, preference: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for a preference already validated and on the adapter's device (a bound or batched one)."""
        if self.merged:
            if not torch.equal(preference.expand_as(self._merged_preference), self._merged_preference):
                raise ValueError(
                    f"layer is merged for preference {self._merged_preference.tolist()}; "
                    f"unmerge() before using preference {preference.tolist()}"
                )
            return self.base_layer(x)
        return self.base_layer(x) + self.adapter_output(x, preference).to(x.dtype)

    def get_delta_weight(self, preference: torch.Tensor) -> torch.Tensor:
        """``s · B · blockdiag(W1, W2(w)) · A``, the ``(out, in)`` update for one ``(k,)`` preference."""
        preference = self._check_preference(preference)
        if preference.dim() != 1:
            raise ValueError(f"get_delta_weight takes one preference of shape (k,), got shape {tuple(preference.shape)}")
        block = torch.block_diag(self.lora_W1, self.preference_block(preference))  # (r1 + r2, r1 + r2)
        return self.scaling * (self.lora_B @ block @ self.lora_A)  # (out, in)

    @torch.no_grad()
    def merge(self, preference: torch.Tensor) -> None:
        """Fold the update for one preference into the base weight (forward then skips the adapter).

        The original weight tensor is kept by reference, so :meth:`unmerge` restores it bit for bit.
        If the base layer's weight is tied to another module, that module sees the merged weight too.
        """
        if self.merged:
            raise RuntimeError("layer is already merged; call unmerge() first")
        preference = self._check_preference(preference)
        weight = self.base_layer.weight
        self._unmerged_weight = weight.data
        weight.data = weight.data + self.get_delta_weight(preference).to(weight.dtype)
        self._merged_preference = preference.clone()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weight that :meth:`merge` replaced."""
        if not self.merged:
            raise RuntimeError("layer is not merged")
        self.base_layer.weight.data = self._unmerged_weight
        self._unmerged_weight = None
        self._merged_preference = None

    def extra_repr(self) -> str:
        return f"r1={self.r1}, r2={self.r2}, num_objectives={self.num_objectives}, scaling={self.scaling:g}"
