"""The Dual-Head model: a frozen backbone with a preference-aware reward head and context gate fused per token."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .backbone import DEFAULT_BACKBONE, cache_kwargs, load_backbone, tokenizer_fingerprint, weights_fingerprint
from .blocks import position_ids_from_mask
from .files import atomic_write, is_int, json_text, read_json_object, read_safetensors, safetensors_shapes
from .heads import REWARD_CONTEXTS, REWARD_HEAD_KINDS, ContextGate, GateCache, RewardBranch, RewardHead, prompt_context
from .pblora import PBLoRAConfig
from .preference import DEFAULT_OBJECTIVES, preference_batch

CHECKPOINT_ENV = "PARETOALIGN_CHECKPOINT"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "default"
CONFIG_NAME = "dualhead_config.json"
WEIGHTS_NAME = "dualhead_model.safetensors"
CHECKPOINT_FIELDS = ("backbone", "objectives", "reward_head", "vocab_size", "hidden_size")  # what save_pretrained always writes
FUSION_MODES = ("gate", "genarm")
REWARD_BASELINES = ("backbone", "none")
REWARD_REDUCTIONS = ("sum", "mean")


@dataclass
class DualHeadConfig:
    """Everything that builds a :class:`DualHeadModel` besides the backbone's own weights."""

    backbone: str = field(default=DEFAULT_BACKBONE, metadata={"help": "backbone id or path the heads were built for"})
    objectives: list[str] = field(default_factory=lambda: list(DEFAULT_OBJECTIVES), metadata={"help": "objective names, in preference order"})
    reward_head: str = field(default="pblora", metadata={"help": f"one of {REWARD_HEAD_KINDS}"})
    reward_adapter: PBLoRAConfig = field(default_factory=lambda: PBLoRAConfig(r1=4, r2=8, lora_alpha=16.0))
    reward_baseline: str = field(
        default="backbone",
        metadata={
            "help": f"one of {REWARD_BASELINES}: 'backbone' measures R = sum_t [log pi_r - log pi_LM] (the head's change to "
            "the frozen LM, DPO's implicit reward); 'none' is GenARM's literal R = sum_t log pi_r"
        },
    )
    reward_reduction: str = field(
        default="sum",
        metadata={
            "help": f"one of {REWARD_REDUCTIONS}: how a response's token rewards make its reward in the preference loss "
            "and in arm-accuracy; 'sum' is GenARM's, 'mean' divides by the response's length. Decoding is the same "
            "either way (it fuses token logits)"
        },
    )
    reward_layers: int = field(
        default=0,
        metadata={
            "help": "k: the reward head reads its own re-run of the backbone's last k blocks (PBLoRA on their attention, "
            "from the shared state at block N-k) instead of the final hidden state; 0 reads the final state. Extra "
            "decode cost about k/N of a backbone pass"
        },
    )
    reward_context: str = field(
        default="none",
        metadata={
            "help": f"one of {REWARD_CONTEXTS}: 'prompt' lets the reward head (kind 'hidden') read the prompt's mean final "
            "state beside each position's own, so what it pushes can depend on the request as a whole; 'prompt-product' "
            "also reads their rescaled product, so the request can change what it pushes at each point of the reply; "
            "'none' reads the position's state only"
        },
    )
    gate_size: int = field(default=256, metadata={"help": "width of the gate's attention"})
    gate_heads: int = field(default=4, metadata={"help": "attention heads in the gate (1: single-head ablation)"})
    gate_adapter: PBLoRAConfig = field(default_factory=lambda: PBLoRAConfig(r1=2, r2=4, lora_alpha=8.0))
    fixed_gate: float | None = field(default=None, metadata={"help": "use this constant alpha instead of the gate (ablation)"})
    fusion: str = field(default="gate", metadata={"help": f"default fusion, one of {FUSION_MODES}"})
    strength: float = field(default=1.0, metadata={"help": "default steering strength (gate: scales alpha; genarm: 1/beta)"})
    guidance_top_k: int = field(
        default=0,
        metadata={
            "help": "decoding keeps the frozen LM's k likeliest tokens only, so the reward head reorders what the base model "
            "finds plausible (as ARGS and RAD do) and never promotes a token it finds unlikely; 0 keeps every token"
        },
    )
    no_repeat_ngram_size: int = field(
        default=0,
        metadata={
            "help": "decoding's default loop guard: no n-gram of an answer occurs twice, for every method decoded with this "
            "model (0: off); like strength and guidance_top_k, chosen on validation prompts and overridable per call"
        },
    )
    vocab_size: int | None = field(default=None, metadata={"help": "filled from the backbone"})
    hidden_size: int | None = field(default=None, metadata={"help": "filled from the backbone"})
    tokenizer_fingerprint: str | None = field(default=None, metadata={"help": "filled from the tokenizer"})
    weights_fingerprint: str | None = field(default=None, metadata={"help": "filled from the backbone's embedding"})

    def __post_init__(self):
        if isinstance(self.reward_adapter, dict):
            self.reward_adapter = PBLoRAConfig(**self.reward_adapter)
        if isinstance(self.gate_adapter, dict):
            self.gate_adapter = PBLoRAConfig(**self.gate_adapter)
        self.objectives = list(self.objectives)
        if not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"objectives must be distinct names, got {self.objectives!r}")
        if self.reward_head not in REWARD_HEAD_KINDS:
            raise ValueError(f"reward_head must be one of {REWARD_HEAD_KINDS}, got {self.reward_head!r}")
        if self.reward_baseline not in REWARD_BASELINES:
            raise ValueError(f"reward_baseline must be one of {REWARD_BASELINES}, got {self.reward_baseline!r}")
        if self.reward_reduction not in REWARD_REDUCTIONS:
            raise ValueError(f"reward_reduction must be one of {REWARD_REDUCTIONS}, got {self.reward_reduction!r}")
        if self.reward_context not in REWARD_CONTEXTS:
            raise ValueError(f"reward_context must be one of {REWARD_CONTEXTS}, got {self.reward_context!r}")
        if self.reward_context != "none" and self.reward_head != "hidden":
            raise ValueError(f"reward_context {self.reward_context!r} needs reward_head 'hidden', got {self.reward_head!r}")
        if not is_int(self.reward_layers, 0):
            raise ValueError(f"reward_layers must be an integer >= 0, got {self.reward_layers!r}")
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, got {self.fusion!r}")
        if self.gate_heads < 1 or self.gate_size < 1 or self.gate_size % self.gate_heads:
            raise ValueError(f"gate_size ({self.gate_size}) must be a positive multiple of gate_heads ({self.gate_heads})")
        if self.fixed_gate is not None and not 0.0 <= self.fixed_gate <= 1.0:
            raise ValueError(f"fixed_gate must lie in [0, 1], got {self.fixed_gate!r}")
        if self.strength < 0:
            raise ValueError(f"strength must be >= 0, got {self.strength!r}")
        check_guidance_top_k(self.guidance_top_k)
        check_no_repeat_ngram_size(self.no_repeat_ngram_size)

    @property
    def num_objectives(self) -> int:
        return len(self.objectives)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        """The text of ``dualhead_config.json``."""
        return json_text(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> "DualHeadConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DualHeadConfig fields {unknown}")
        return cls(**data)


@dataclass
class DualHeadOutput:
    """Per-position outputs of one backbone pass."""

    lm_logits: torch.Tensor  # (B, T, V) z_LM
    reward_logits: torch.Tensor  # (B, T, V) z_RM
    gate: torch.Tensor  # (B, T) alpha_t
    logits: torch.Tensor  # (B, T, V) fused


def fuse_logits(
    lm_logits: torch.Tensor, reward_logits: torch.Tensor, alpha: torch.Tensor, fusion: str = "gate", strength: float = 1.0
) -> torch.Tensor:
    """Fuse the two heads.

    ``gate``:   z = z_LM + strength · alpha_t · (z_RM − z_LM)   (strength 1: (1 − alpha) z_LM + alpha z_RM)
    ``genarm``: z = log_softmax(z_LM) + strength · log_softmax(z_RM)   (strength = 1/beta)

    Args:
        lm_logits, reward_logits: ``(..., V)``.
        alpha: ``(...)`` gate values (unused by ``genarm``).
    """
    if fusion == "gate":
        return lm_logits + (strength * alpha).unsqueeze(-1) * (reward_logits - lm_logits)  # (..., V)
    if fusion == "genarm":
        return F.log_softmax(lm_logits, dim=-1) + strength * F.log_softmax(reward_logits, dim=-1)  # (..., V)
    raise ValueError(f"fusion must be one of {FUSION_MODES}, got {fusion!r}")


def check_no_repeat_ngram_size(size) -> int:
    """``size`` if it is 0 (no loop guard) or an n-gram length >= 2, else a ``ValueError`` naming it."""
    if not is_int(size, 0) or size == 1:
        raise ValueError(f"no_repeat_ngram_size must be 0 (off) or an integer >= 2, got {size!r}")
    return size


def check_guidance_top_k(top_k) -> int:
    if not is_int(top_k, 0):
        raise ValueError(f"guidance_top_k must be an integer >= 0 (0 keeps every token), got {top_k!r}")
    return top_k


def restrict_to_base_top_k(logits: torch.Tensor, lm_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """``logits`` ``(..., V)`` with every token outside the frozen LM's ``top_k`` likeliest set to ``-inf`` (0: unchanged)."""
    if not top_k or top_k >= logits.shape[-1]:
        return logits
    keep = lm_logits.topk(top_k, dim=-1).indices  # (..., k)
    return torch.full_like(logits, float("-inf")).scatter(-1, keep, logits.gather(-1, keep))  # (..., V)


def backbone_forward(
    backbone: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    past_key_values=None,
    output_hidden_states: bool = False,
):
    """The backbone's block stack over new ids ``(B, T)`` under a ``(B, P + T)`` mask (left padding skipped in the
    positions); ``past_key_values`` is extended in place when given. Returns transformers' base-model output."""
    positions = position_ids_from_mask(attention_mask)[:, -input_ids.shape[1] :]  # (B, T)
    return backbone.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=past_key_values is not None,
        output_hidden_states=output_hidden_states,
        **cache_kwargs(type(backbone.base_model).forward, past_key_values),
    )


def backbone_hidden(backbone: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_key_values=None) -> torch.Tensor:
    """Final hidden states ``(B, T, d)`` of ``backbone`` for new ids ``(B, T)`` under a ``(B, P + T)`` mask."""
    return backbone_forward(backbone, input_ids, attention_mask, past_key_values).last_hidden_state


class DualHeadModel(nn.Module):
    """A frozen causal LM with a preference-aware reward head and context gate over its last hidden state.

    Example:
        >>> model = DualHeadModel(backbone, tokenizer, DualHeadConfig(backbone="my-llm"))
        >>> out = model(input_ids, attention_mask, preference=torch.tensor([0.3, 0.7]))
        >>> out.logits.shape  # (B, T, V)
    """

    def __init__(self, backbone: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: DualHeadConfig | None = None):
        super().__init__()
        config = config or DualHeadConfig(backbone=getattr(backbone, "name_or_path", None) or DEFAULT_BACKBONE)
        observed = {
            "vocab_size": backbone.get_output_embeddings().out_features,
            "hidden_size": backbone.get_output_embeddings().in_features,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "weights_fingerprint": weights_fingerprint(backbone),
        }
        loaded_name = getattr(backbone, "name_or_path", None) or "<unnamed>"
        for name, value in observed.items():
            expected = getattr(config, name)
            if expected is None:
                setattr(config, name, value)
            elif expected != value:
                raise ValueError(
                    f"checkpoint was made for backbone {config.backbone!r} but the loaded backbone is "
                    f"{loaded_name!r}: {name} {expected!r} != {value!r}"
                )
        self.config = config
        self.tokenizer = tokenizer
        self.backbone = backbone.eval().requires_grad_(False)
        device = backbone.get_output_embeddings().weight.device
        self.reward_head = RewardHead(
            backbone.get_output_embeddings(), config.reward_head, config.reward_adapter, config.num_objectives, config.reward_context
        )
        self.context_gate = ContextGate(
            config.hidden_size, config.gate_size, config.gate_heads, config.gate_adapter, config.num_objectives, config.fixed_gate
        )
        self.reward_branch = None
        if config.reward_layers:
            preference_aware = config.reward_head != "lora"  # the preference-unaware ablation stays unaware throughout
            self.reward_branch = RewardBranch(
                backbone, config.reward_layers, config.reward_adapter, config.num_objectives, preference_aware
            ).to(device)
        self.reward_head.to(device)
        self.context_gate.to(device)

    @property
    def device(self) -> torch.device:
        return self.backbone.get_output_embeddings().weight.device

    @property
    def objectives(self) -> list[str]:
        return self.config.objectives

    def train(self, mode: bool = True) -> "DualHeadModel":
        super().train(mode)
        self.backbone.eval()  # frozen: dropout stays off
        return self

    def preference_batch(self, preference, batch_size: int) -> torch.Tensor:
        """Validate a ``(k,)`` or ``(B, k)`` preference and return ``(batch_size, k)`` float32 on the model's device."""
        return preference_batch(preference, batch_size, self.config.num_objectives, self.device)

    def backbone_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_key_values=None) -> torch.Tensor:
        """One backbone pass: ``(B, T)`` new ids -> final hidden states ``(B, T, d)``.

        ``attention_mask`` covers cached and new positions, ``(B, P + T)``; ``past_key_values`` (a
        transformers cache) is extended in place when given.
        """
        return backbone_hidden(self.backbone, input_ids, attention_mask, past_key_values)

    @property
    def branch_layer(self) -> int | None:
        """The block whose input the reward branch starts from (``N - reward_layers``), or ``None`` without a branch."""
        return None if self.reward_branch is None else self.reward_branch.first_layer

    def backbone_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_key_values=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One backbone pass: final hidden states ``(B, T, d)`` and, with a reward branch, the residual stream
        entering block ``N - reward_layers`` ``(B, T, d)`` (else ``None``). Arguments as :meth:`backbone_hidden`."""
        if self.reward_branch is None:
            return self.backbone_hidden(input_ids, attention_mask, past_key_values), None
        out = backbone_forward(self.backbone, input_ids, attention_mask, past_key_values, output_hidden_states=True)
        return out.last_hidden_state, out.hidden_states[self.branch_layer]

    def reward_hidden(
        self,
        hidden: torch.Tensor,
        block_hidden: torch.Tensor | None,
        attention_mask: torch.Tensor,
        preference: torch.Tensor,
        branch_cache=None,
        from_layer: int | None = None,
    ) -> torch.Tensor:
        """What the reward head reads: the branch's output from ``block_hidden`` (see :class:`RewardBranch`), or
        the final hidden state ``hidden`` without a branch. Both ``(B, T, d)``."""
        if self.reward_branch is None:
            return hidden
        if block_hidden is None:
            raise ValueError(f"this model's reward branch needs the input of block {self.branch_layer} (block_hidden)")
        return self.reward_branch(block_hidden, attention_mask, preference, branch_cache, from_layer)

    def prompt_context(self, hidden: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor | None:
        """What a ``reward_context="prompt"`` head reads beside each state: the mean final state over each row's prompt
        tokens, ``(B, T, d)``, ``(B, T)`` -> ``(B, d)``; ``None`` for a head without a context."""
        return prompt_context(hidden, prompt_mask) if self.config.reward_context != "none" else None

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """z_LM: the frozen LM head's logits of final states ``(..., d)``, in float32 ``(..., V)``."""
        return self.backbone.get_output_embeddings()(hidden).float()

    def reward_shift(
        self,
        reward_hidden: torch.Tensor,
        preference: torch.Tensor,
        tokens: torch.Tensor,
        hidden: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z_RM − z_LM at a few tokens per position, ``(N, C)``, without a vocabulary-wide product.

        ``reward_hidden`` ``(N, d)``: what the reward head reads (:meth:`reward_hidden`); ``tokens`` ``(N, C)`` ids;
        ``hidden`` ``(N, d)``: the backbone's final state where the reward head reads a branch's own (``None`` when
        they are the same); ``context`` ``(N, d)``: :meth:`prompt_context`'s, row by row. See
        :meth:`RewardHead.candidate_shift`.
        """
        return self.reward_head.candidate_shift(reward_hidden, preference, tokens, hidden, context)

    def gate(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        preference: torch.Tensor,
        gate_cache: GateCache | None = None,
        last_only: bool = False,
        logits: bool = False,
    ) -> tuple[torch.Tensor, GateCache | None]:
        """alpha_t over final states ``(B, T, d)``: ``(B, T)`` (``last_only``: ``(B, 1)``) and the gate's key/value cache;
        ``logits``: alpha's pre-sigmoid values instead."""
        return self.context_gate(hidden.float(), attention_mask, preference, gate_cache, last_only, logits)

    def reward_logits(
        self,
        reward_hidden: torch.Tensor,
        preference: torch.Tensor,
        lm_logits: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z_RM ``(..., V)`` from what the reward head reads ``(..., d)`` and a ``(..., k)`` preference.

        ``lm_logits`` is the frozen LM head's read-out of that same state when the caller has it (no reward branch);
        otherwise it is computed here (the branch's state needs its own). ``context``: :meth:`prompt_context`'s.
        """
        if lm_logits is None:
            lm_logits = self.lm_logits(reward_hidden.to(self.backbone.get_output_embeddings().weight.dtype))  # (..., V)
        return self.reward_head(reward_hidden.float(), lm_logits, preference, context)  # (..., V)

    def heads(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        preference: torch.Tensor,
        gate_cache: GateCache | None = None,
        last_only: bool = False,
        fusion: str | None = None,
        strength: float | None = None,
        reward_hidden: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> tuple[DualHeadOutput, GateCache | None]:
        """Both heads and the fusion over hidden states ``(B, T, d)`` with a ``(B, k)`` preference.

        ``reward_hidden`` ``(B, T, d)`` is what the reward head reads (:meth:`reward_hidden`); default ``hidden``.
        ``context`` ``(B, d)``: the prompt's mean state (:meth:`prompt_context`), for a head that reads one.
        """
        fusion = fusion or self.config.fusion
        strength = self.config.strength if strength is None else strength
        reward_hidden = hidden if reward_hidden is None else reward_hidden
        hidden_out = hidden[:, -1:] if last_only else hidden  # (B, T', d)
        reward_out = reward_hidden[:, -1:] if last_only else reward_hidden  # (B, T', d)
        lm_logits = self.lm_logits(hidden_out)  # (B, T', V)
        shared = lm_logits if reward_hidden is hidden else None  # the LM head's read-out of the same state
        reward_logits = self.reward_logits(reward_out, preference, shared, context)  # (B, T', V)
        alpha, gate_cache = self.gate(hidden, attention_mask, preference, gate_cache, last_only)  # (B, T')
        logits = fuse_logits(lm_logits, reward_logits, alpha, fusion, strength)  # (B, T', V)
        return DualHeadOutput(lm_logits, reward_logits, alpha, logits), gate_cache

    def next_token_logits(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        preference: torch.Tensor,
        gate_cache: GateCache | None = None,
        fusion: str | None = None,
        strength: float | None = None,
        reward_hidden: torch.Tensor | None = None,
        guidance_top_k: int = 0,
        context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, GateCache | None]:
        """The decoding step's read-out at the last position: fused logits restricted to the frozen LM's
        ``guidance_top_k`` likeliest tokens (0: all), the gate and z_LM, ``(B, V)``, ``(B,)``, ``(B, V)``, and the
        gate's cache. Arguments as :meth:`heads`.

        With ``gate`` fusion and a low-rank reward head, z_RM − z_LM is read out at the kept tokens only
        (:meth:`RewardHead.candidate_shift`): the same logits as :meth:`heads` followed by
        :func:`restrict_to_base_top_k`, without the reward head's second vocabulary-wide projection.
        """
        fusion = fusion or self.config.fusion
        strength = self.config.strength if strength is None else strength
        top_k = check_guidance_top_k(guidance_top_k)
        vocab = self.backbone.get_output_embeddings().out_features
        if fusion != "gate" or self.reward_head.kind == "full_rank" or not 0 < top_k < vocab:
            output, gate_cache = self.heads(hidden, attention_mask, preference, gate_cache, True, fusion, strength, reward_hidden, context)
            logits = restrict_to_base_top_k(output.logits[:, -1], output.lm_logits[:, -1], top_k)  # (B, V)
            return logits, output.gate[:, -1], output.lm_logits[:, -1], gate_cache
        last = hidden[:, -1]  # (B, d)
        lm_logits = self.lm_logits(hidden[:, -1:])[:, -1]  # (B, V), as heads() reads it
        keep = lm_logits.topk(top_k, dim=-1).indices  # (B, k)
        if reward_hidden is None or reward_hidden is hidden:
            shift = self.reward_shift(last, preference, keep, context=context)  # (B, k)
        else:  # a reward branch's own state: its change of the state is read out too
            shift = self.reward_shift(reward_hidden[:, -1], preference, keep, last, context)  # (B, k)
        alpha, gate_cache = self.gate(hidden, attention_mask, preference, gate_cache, True)  # (B, 1)
        alpha = alpha[:, -1]  # (B,)
        kept = lm_logits.gather(-1, keep) + (strength * alpha)[:, None] * shift  # (B, k)
        logits = torch.full_like(lm_logits, float("-inf")).scatter(-1, keep, kept)  # (B, V)
        return logits, alpha, lm_logits, gate_cache

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        preference: torch.Tensor | None = None,
        fusion: str | None = None,
        strength: float | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> DualHeadOutput:
        """z_LM, z_RM, alpha_t and fused logits for every position, from one backbone pass.

        Args:
            input_ids: ``(B, T)``.
            attention_mask: ``(B, T)``, 1 for tokens, 0 for (left) padding; all ones if omitted.
            preference: ``(k,)`` for all rows or ``(B, k)`` one per row; each on the simplex.
            prompt_mask: ``(B, T)``, 1 on the prompt's tokens, for a head that reads the prompt's mean state
                (``reward_context="prompt"``); default ``attention_mask`` (the whole input is the prompt).
        """
        if preference is None:
            raise ValueError(f"preference is required: weights over {self.objectives}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        preference = self.preference_batch(preference, input_ids.shape[0])
        hidden, block_hidden = self.backbone_states(input_ids, attention_mask)
        reward_hidden = self.reward_hidden(hidden, block_hidden, attention_mask, preference)
        context = self.prompt_context(hidden, attention_mask if prompt_mask is None else prompt_mask * attention_mask)
        output, _ = self.heads(
            hidden, attention_mask, preference, fusion=fusion, strength=strength, reward_hidden=reward_hidden, context=context
        )
        return output

    # ------------------------------------------------------------------ save / load

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable parameters only (the frozen backbone is never saved)."""
        return {name: p.detach().contiguous() for name, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``dualhead_config.json`` and ``dualhead_model.safetensors`` (trainable weights) atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.to("cpu") for name, t in self.trainable_state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        text = self.config.to_json()
        atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))

    def load_trainable_state_dict(self, tensors: dict[str, torch.Tensor], source: str = "state dict") -> None:
        expected = {name for name, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise ValueError(f"{source} does not match this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        parameters = dict(self.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                if parameters[name].shape != tensor.shape:
                    raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, expected {tuple(parameters[name].shape)}")
                parameters[name].copy_(tensor)

    @staticmethod
    def read_config(directory: str | os.PathLike) -> DualHeadConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint directory {str(directory)!r}")
        data = read_json_object(path, "checkpoint config")
        missing = [name for name in CHECKPOINT_FIELDS if name not in data]
        if missing:
            raise ValueError(f"checkpoint config {str(path)!r} lacks {missing}: not a config written by save_pretrained")
        try:
            return DualHeadConfig.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"checkpoint config {str(path)!r}: {error}") from None

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        backbone: PreTrainedModel | str | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
    ) -> "DualHeadModel":
        """Load heads saved by :meth:`save_pretrained` onto their backbone (loaded from the config if not given).

        Raises ``ValueError`` naming both backbones when the checkpoint was made for another one.
        """
        config = cls.read_config(directory)
        weights = Path(directory) / WEIGHTS_NAME
        safetensors_shapes(weights, "checkpoint weights")  # a damaged file fails before the backbone loads
        if backbone is None or isinstance(backbone, str):
            backbone, tokenizer = load_backbone(backbone or config.backbone, device, dtype, trust_remote_code)
        elif tokenizer is None:
            raise ValueError("pass the backbone's tokenizer together with a loaded backbone")
        model = cls(backbone, tokenizer, config)
        model.load_trainable_state_dict(read_safetensors(weights, str(model.device), "checkpoint weights"), source=str(weights))
        return model.eval()


def default_checkpoint() -> Path | None:
    """The shipped checkpoint (``checkpoints/default``), or ``$PARETOALIGN_CHECKPOINT``; ``None`` if absent."""
    override = os.environ.get(CHECKPOINT_ENV)
    path = Path(override).expanduser() if override else DEFAULT_CHECKPOINT
    if override and not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{CHECKPOINT_ENV}={override!r} has no {CONFIG_NAME}")
    return path if (path / CONFIG_NAME).is_file() else None


@dataclass(kw_only=True)
class ModelSettings:
    """Which Dual-Head model a command loads: the options ``generate``, ``sweep`` and ``arm-accuracy`` share."""

    checkpoint: str | None = field(default=None, metadata={"help": "Dual-Head checkpoint directory (default: the shipped one)"})
    backbone: str | None = field(default=None, metadata={"help": "backbone id or path, when not loading it from a checkpoint"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "let transformers run the backbone's own code"})

    def load_model(self, dtype: torch.dtype | str | None = None) -> DualHeadModel:
        """:func:`load_model` with these settings."""
        return load_model(self.checkpoint, self.backbone, self.device, dtype, trust_remote_code=self.trust_remote_code)


def load_model(
    checkpoint: str | os.PathLike | None = None,
    backbone: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> DualHeadModel:
    """The model a user means: ``checkpoint`` if given, else the shipped default checkpoint, else untrained
    heads on ``backbone`` (default: the offline SmolLM2), which reproduce the backbone exactly."""
    checkpoint = checkpoint if checkpoint is not None else default_checkpoint()
    if checkpoint is not None:
        return DualHeadModel.from_pretrained(checkpoint, backbone, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return base_model(backbone, device, dtype, trust_remote_code)


def base_model(
    backbone: str | None = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> DualHeadModel:
    """Untrained heads on ``backbone`` (default: the offline SmolLM2): they reproduce the backbone exactly."""
    name = backbone or DEFAULT_BACKBONE
    model, tokenizer = load_backbone(name, device, dtype, trust_remote_code)
    torch.manual_seed(0)
    return DualHeadModel(model, tokenizer, DualHeadConfig(backbone=name)).eval()
