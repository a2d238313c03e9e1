"""Autoregressive reward models (ARMs) for GenARM and PARM: configs, adapters on the top blocks, checkpoints, rewards.

An ARM is a language model ``pi_r`` whose sequence log-probability is a reward, ``R(x, y) = sum_t log pi_r(y_t | x, y_<t)``
(GenARM). Here it is a full copy of the frozen backbone with adapters on the attention projections of its top
``layers`` blocks only: LoRA through peft for GenARM (one ARM per objective), :class:`BoundPBLoRALinear` for PARM (one
ARM, conditioned on the preference). Because the blocks below stay frozen, training reads the input of the first
adapted block from a feature cache and runs only the blocks above it (:func:`top_blocks_hidden`).

A checkpoint directory holds ``arm_config.json`` (:class:`ARMConfig`) beside the adapter weights: peft's
``adapter_config.json`` + ``adapter_model.safetensors`` for GenARM, ``pblora_adapter.safetensors`` for PARM.
``arm_config.json`` is written last, so a directory that has it is complete.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..backbone import tokenizer_fingerprint, weights_fingerprint
from ..batches import PairBatch
from ..blocks import (  # noqa: F401  (BoundPBLoRALinear, bind_preference, causal_lm: part of this module's API)
    ATTENTION_PROJECTIONS,
    BoundPBLoRALinear,
    add_attention_pblora,
    bind_preference,
    causal_lm,
    decoder_stack,
    run_blocks,
)
from ..files import atomic_write, check_positive_int, is_int, read_json_object, read_safetensors, safetensors_shapes, write_json
from ..losses import label_logprobs, next_token_targets
from ..pblora import PBLoRAConfig

ARM_METHODS = ("genarm", "parm")
BASELINE_METHODS = (*ARM_METHODS, "dualhead-unconditioned")
CONFIG_NAME = "arm_config.json"
PBLORA_WEIGHTS_NAME = "pblora_adapter.safetensors"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # peft's own file name (save_pretrained)
CHECKPOINT_ROOT_ENV = "PARETOALIGN_BASELINE_CHECKPOINTS"
DEFAULT_CHECKPOINT_ROOT = Path(__file__).resolve().parents[2] / "checkpoints"
# PARM's default adapters scale like GenARM's LoRA (lora_alpha / rank = 2) and match the Dual-Head's reward head.
DEFAULT_PBLORA = {"r1": 4, "r2": 8, "lora_alpha": 16.0}


# ---------------------------------------------------------------------------------------------- where checkpoints live


def checkpoint_root() -> Path:
    """The folder holding ``genarm-<objective>/``, ``parm/`` and ``dualhead-unconditioned/``:
    ``$PARETOALIGN_BASELINE_CHECKPOINTS``, or the repository's ``checkpoints/``."""
    override = os.environ.get(CHECKPOINT_ROOT_ENV)
    return Path(override).expanduser() if override else DEFAULT_CHECKPOINT_ROOT


def default_checkpoint(method: str, objective: str | None = None) -> Path:
    """Where ``paretoalign train-arm --method METHOD`` writes by default and the decoders look by default."""
    if method not in BASELINE_METHODS:
        raise ValueError(f"method must be one of {BASELINE_METHODS}, got {method!r}")
    if method == "genarm":
        if not objective:
            raise ValueError("a GenARM checkpoint belongs to one objective; pass objective=")
        return checkpoint_root() / f"genarm-{objective}"
    return checkpoint_root() / method


def train_command(method: str, directory: str | os.PathLike, objective: str | None = None) -> str:
    """The command that creates the checkpoint ``directory`` of ``method``."""
    objective_flag = f" --objective {objective}" if method == "genarm" and objective else ""
    return f"paretoalign train-arm --method {method}{objective_flag} --out {directory}"


def missing_checkpoint(method: str, directory: str | os.PathLike, marker: str, objective: str | None = None) -> FileNotFoundError:
    what = f"{method} checkpoint" + (f" for objective {objective!r}" if objective else "")
    return FileNotFoundError(
        f"the {what} {str(directory)!r} is missing (no {marker}); create it with: {train_command(method, directory, objective)}"
    )


# ---------------------------------------------------------------------------------------------- config


@dataclass
class LoRASettings:
    """GenARM's LoRA adapters (peft ``LoraConfig``) on the attention projections of the top blocks."""

    r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "scaling numerator: s = lora_alpha / r"})

    def __post_init__(self):
        check_positive_int("r", self.r)
        if not (isinstance(self.lora_alpha, (int, float)) and math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        self.lora_alpha = float(self.lora_alpha)


@dataclass
class ARMConfig:
    """Everything that rebuilds an ARM besides the backbone's weights; saved as ``arm_config.json``."""

    method: str = field(metadata={"help": f"one of {ARM_METHODS}: genarm (one LoRA ARM per objective) or parm (one PBLoRA ARM)"})
    objectives: list[str] = field(metadata={"help": "genarm: the one objective this ARM scores; parm: all, in preference order"})
    backbone: str = field(metadata={"help": "backbone id or path the adapters were trained on"})
    num_hidden_layers: int = field(metadata={"help": "blocks of that backbone"})
    layers: int = field(default=4, metadata={"help": "adapted blocks at the top; training starts from the input of the first"})
    adapter: LoRASettings | PBLoRAConfig | None = field(
        default=None,
        metadata={"help": "genarm: LoRASettings; parm: PBLoRAConfig (defaults when None: r=8 / r1=4, r2=8; alpha 16)"},
    )
    beta_r: float = field(default=0.1, metadata={"help": "Bradley-Terry scale of R(chosen) - R(rejected) in training"})
    weights_fingerprint: str | None = field(default=None, metadata={"help": "filled from the backbone's embedding"})
    tokenizer_fingerprint: str | None = field(default=None, metadata={"help": "filled from the tokenizer"})
    training: dict = field(default_factory=dict, metadata={"help": "how it was trained (a record, not read back)"})

    def __post_init__(self):
        if self.method not in ARM_METHODS:
            raise ValueError(f"method must be one of {ARM_METHODS}, got {self.method!r}")
        self.objectives = list(self.objectives)
        if not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"objectives must be distinct names, got {self.objectives!r}")
        if self.method == "genarm" and len(self.objectives) != 1:
            raise ValueError(f"a GenARM ARM scores one objective, got objectives {self.objectives!r}")
        check_positive_int("num_hidden_layers", self.num_hidden_layers)
        if not is_int(self.layers, 1) or self.layers > self.num_hidden_layers:
            raise ValueError(
                f"layers must be an integer in [1, {self.num_hidden_layers}] (the backbone's blocks), got {self.layers!r}"
            )
        kind = LoRASettings if self.method == "genarm" else PBLoRAConfig
        if self.adapter is None:
            self.adapter = LoRASettings() if self.method == "genarm" else PBLoRAConfig(**DEFAULT_PBLORA)
        elif isinstance(self.adapter, dict):
            self.adapter = kind(**self.adapter)
        if not isinstance(self.adapter, kind):
            raise TypeError(
                f"a {self.method} ARM needs adapter settings of type {kind.__name__}, got {type(self.adapter).__name__}"
            )
        if not self.beta_r > 0:
            raise ValueError(f"beta_r must be > 0, got {self.beta_r!r}")

    @property
    def first_layer(self) -> int:
        """The first adapted block; the blocks below it are the frozen backbone's."""
        return self.num_hidden_layers - self.layers

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, directory: str | os.PathLike) -> None:
        write_json(Path(directory) / CONFIG_NAME, self.to_dict())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ARMConfig:
        path = Path(directory) / CONFIG_NAME
        data = read_json_object(path, "ARM config")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown ARMConfig fields {unknown}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"ARM config {str(path)!r}: {error}") from None

    @classmethod
    def for_backbone(cls, method: str, objectives: Sequence[str], backbone, tokenizer, **settings) -> ARMConfig:
        """A config for ``backbone``, with its name, depth and fingerprints filled in."""
        return cls(
            method=method,
            objectives=list(objectives),
            backbone=getattr(backbone, "name_or_path", None) or "<unnamed>",
            num_hidden_layers=backbone.config.num_hidden_layers,
            weights_fingerprint=weights_fingerprint(backbone),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            **settings,
        )

    def check_backbone(self, backbone, tokenizer, source: str) -> None:
        """Raise ``ValueError`` naming both backbones unless ``backbone`` is the one these adapters were trained on."""
        observed = {
            "num_hidden_layers": backbone.config.num_hidden_layers,
            "weights_fingerprint": weights_fingerprint(backbone),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        }
        loaded = getattr(backbone, "name_or_path", None) or "<unnamed>"
        for name, value in observed.items():
            if getattr(self, name) != value:
                raise ValueError(
                    f"{source} was trained on backbone {self.backbone!r} but the loaded backbone is {loaded!r}: "
                    f"{name} {getattr(self, name)!r} != {value!r}"
                )


# ---------------------------------------------------------------------------------------------- the top blocks


def top_blocks_hidden(arm: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, first_layer: int) -> torch.Tensor:
    """Final hidden states from the input of block ``first_layer``: the blocks from there up, then the final norm.

    Equals the last hidden state of a full forward over the same left-padded sequences (tested), so adapters on
    those blocks train from a cache of the frozen lower blocks' output (:func:`paretoalign.features.block_input`).

    Args:
        hidden: ``(B, T, d)`` input of block ``first_layer``.
        attention_mask: ``(B, T)``, 1 for tokens, 0 for left padding.

    Returns:
        ``(B, T, d)``.
    """
    stack = decoder_stack(arm)
    return stack.norm(run_blocks(stack, stack.layers[first_layer:], hidden, attention_mask))  # (B, T, d)


def sequence_rewards(arm: nn.Module, batch: PairBatch, first_layer: int) -> torch.Tensor:
    """GenARM's reward ``R = sum_t log pi_r(y_t | x, y_<t)`` over each sequence's response tokens: ``(2B,)``.

    ``batch.hidden`` holds the input of block ``first_layer``; only positions that predict a response token go
    through the vocabulary projection.
    """
    top = top_blocks_hidden(arm, batch.hidden, batch.attention_mask, first_layer)  # (2B, T, d)
    labels, mask = next_token_targets(batch.input_ids, batch.response_mask)  # (2B, T-1), (2B, T-1)
    rows, cols = mask.nonzero(as_tuple=True)  # (N,), (N,): logits at position t predict token t + 1
    logits = causal_lm(arm).get_output_embeddings()(top[rows, cols]).float()  # (N, V)
    logprobs = label_logprobs(logits, labels[rows, cols])  # (N,)
    return logprobs.new_zeros(batch.input_ids.shape[0]).index_add(0, rows, logprobs)  # (2B,)


def guided_logits(base_logits: torch.Tensor, arm_logits: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``log_softmax(z_base) + sum_i weights[:, i] · log_softmax(z_i)``: GenARM's and PARM's next-token scores.

    Args:
        base_logits: ``(B, V)`` the frozen backbone's logits.
        arm_logits: one ``(B, V)`` per ARM.
        weights: ``(B, n_arms)``; GenARM uses ``w_i / beta``, PARM ``1 / beta`` for its one ARM.
    """
    if weights.dim() != 2 or weights.shape != (base_logits.shape[0], len(arm_logits)):
        raise ValueError(
            f"weights must have shape (B, n_arms) = {(base_logits.shape[0], len(arm_logits))}, got {tuple(weights.shape)}"
        )
    scores = F.log_softmax(base_logits.float(), dim=-1)  # (B, V)
    for index, logits in enumerate(arm_logits):
        scores = scores + weights[:, index, None].to(scores.dtype) * F.log_softmax(logits.float(), dim=-1)  # (B, V)
    return scores


# ---------------------------------------------------------------------------------------------- adapters


def _peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError("GenARM's LoRA adapters need peft: pip install 'paretoalign[train]' (or pip install peft)") from error
    return peft


@contextlib.contextmanager
def _quiet_peft():
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model; that FutureWarning is
    about peft's call, not the user's, so it is kept off their terminal."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def lora_config(config: ARMConfig):
    """peft's ``LoraConfig`` for a GenARM ARM: q/k/v/o projections of the top ``config.layers`` blocks only."""
    return _peft().LoraConfig(
        task_type="CAUSAL_LM",
        r=config.adapter.r,
        lora_alpha=config.adapter.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(ATTENTION_PROJECTIONS),
        layers_to_transform=list(range(config.first_layer, config.num_hidden_layers)),
    )


def add_pblora(model: nn.Module, config: ARMConfig) -> nn.Module:
    """Wrap (in place) the attention projections of the top ``config.layers`` blocks of ``model`` in
    :class:`BoundPBLoRALinear`; returns ``model``. Their ``lora_B`` start at zero, so ``model`` still computes the backbone."""
    settings = config.adapter
    blocks = decoder_stack(model).layers[config.first_layer :]
    add_attention_pblora(blocks, settings.r1, settings.r2, len(config.objectives), settings.lora_alpha, config.first_layer)
    return model


def adapter_parameters(arm: nn.Module) -> dict[str, nn.Parameter]:
    """The ARM's adapter weights by name: what training changes and a checkpoint holds."""
    return {name: parameter for name, parameter in arm.named_parameters() if ".lora_" in name}


def new_arm(backbone: nn.Module, config: ARMConfig) -> nn.Module:
    """A trainable ARM: a deep copy of the frozen ``backbone`` with fresh adapters on its top blocks.

    ``lora_B`` starts at zero in both kinds, so a fresh ARM computes exactly the backbone (``pi_r = pi_base``).
    Seed torch first for reproducible ``lora_A``.
    """
    model = copy.deepcopy(backbone).eval().requires_grad_(False)
    if config.method == "genarm":
        with _quiet_peft():
            return _peft().get_peft_model(model, lora_config(config)).eval()
    add_pblora(model, config)
    for parameter in adapter_parameters(model).values():
        parameter.requires_grad_(True)
    return model


def save_arm(arm: nn.Module, config: ARMConfig, directory: str | os.PathLike) -> None:
    """Write the adapters (safetensors) and ``arm_config.json`` (JSON, written last) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if config.method == "genarm":
        # peft writes adapter_config.json + adapter_model.safetensors; the embeddings are not adapted, and "auto"
        # would look the backbone up on the hub to decide that.
        arm.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False)
    else:
        tensors = {name: parameter.detach().to("cpu").contiguous() for name, parameter in adapter_parameters(arm).items()}
        atomic_write(directory / PBLORA_WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    card = arm_card(config)  # replaces peft's template card (which records the local backbone path)
    atomic_write(directory / "README.md", lambda tmp: Path(tmp).write_text(card))
    config.save(directory)


def arm_card(config: ARMConfig) -> str:
    """A short model card for an ARM checkpoint: what it is, how it was trained, its validation accuracy."""
    kind = "GenARM autoregressive reward model (LoRA via peft)" if config.method == "genarm" else "PARM preference-aware ARM (PBLoRA)"
    training = config.training or {}
    accuracy = "\n".join(f"- {key.removeprefix('val/')}: {value:.3f}" for key, value in training.items() if key.startswith("val/"))
    settings = ", ".join(f"{key} {value}" for key, value in asdict(config.adapter).items())
    return f"""# {config.method} ARM: {', '.join(config.objectives)}

A {kind} for the paretoalign baselines, on the frozen backbone `{config.backbone}`: adapters on the q/k/v/o
projections of its top {config.layers} of {config.num_hidden_layers} blocks ({settings}), trained with GenARM's
Bradley-Terry loss on R = sum_t log pi_r(y_t | x, y_<t), beta_r = {config.beta_r}, from cached states of the
lower blocks. Decoding with it costs one extra full model pass per token (`paretoalign sweep --methods {config.method}`).

Training: {training.get('steps', '?')} steps, {training.get('train_seconds', '?')} s on {training.get('machine', '?')};
log in `training_log.jsonl`. Recreate with the settings of `arm_train_config.json` (its flags): `{train_command(config.method, '<dir>', config.objectives[0] if config.method == 'genarm' else None)}`.

Validation accuracy (chosen reply gets the higher reward):

{accuracy or '- not measured'}
"""


def load_arm(directory: str | os.PathLike, backbone: nn.Module, tokenizer, method: str, objective: str | None = None):
    """Load the ARM saved in ``directory`` onto a full copy of ``backbone``; returns ``(arm, config)``.

    Raises:
        FileNotFoundError: the checkpoint is missing, naming the path and the command that creates it.
        ValueError: it holds another method's ARM, another objective's, or was trained on another backbone.
    """
    directory = Path(directory).expanduser()
    if not (directory / CONFIG_NAME).is_file():
        raise missing_checkpoint(method, directory, CONFIG_NAME, objective)
    config = ARMConfig.load(directory)
    if config.method != method:
        raise ValueError(f"{directory} holds a {config.method} ARM, not a {method} one")
    if objective is not None and config.objectives != [objective]:
        raise ValueError(f"{directory} holds the ARM of objective(s) {config.objectives}, not of {objective!r}")
    config.check_backbone(backbone, tokenizer, str(directory))
    model = copy.deepcopy(backbone).eval().requires_grad_(False)
    device = str(backbone.get_output_embeddings().weight.device)
    if method == "genarm":
        safetensors_shapes(directory / "adapter_model.safetensors", "ARM weights")  # damage fails here, not inside peft
        with _quiet_peft():
            arm = _peft().PeftModel.from_pretrained(model, str(directory), is_trainable=False)
    else:
        arm = add_pblora(model, config)
        tensors = read_safetensors(directory / PBLORA_WEIGHTS_NAME, device, "ARM weights")
        expected = adapter_parameters(arm)
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{directory / PBLORA_WEIGHTS_NAME} does not match {CONFIG_NAME}: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        with torch.no_grad():
            for name, parameter in expected.items():
                parameter.copy_(tensors[name])
                parameter.requires_grad_(False)
    return arm.eval(), config


def adapter_size(arm: nn.Module) -> int:
    """Number of adapter weights of ``arm`` (what the method trained)."""
    return sum(parameter.numel() for parameter in adapter_parameters(arm).values())
