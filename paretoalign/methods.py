"""The registry of decoding methods: one name -> one :class:`~paretoalign.generation.Decoder` factory.

A factory is called as ``build(model, strength=..., fusion=..., **options)`` with the loaded
:class:`~paretoalign.model.DualHeadModel` and returns a fresh decoder; it must accept (and may
ignore) options it does not use. Registering a method is one line, for example::

    register_method("genarm", "paretoalign.baselines.genarm:build_decoder", description="GenARM: base + ARM logits")

A ``"module:attribute"`` string is imported only when the method is built, so a method's module may
import :mod:`paretoalign.generation` without an import cycle.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .generation import BaseDecoder, Decoder, DualHeadDecoder


@dataclass(frozen=True)
class Method:
    """A decoding method the sweep (and the app) runs by name."""

    name: str
    build: Callable[..., Decoder] | str  # (model, **options) -> Decoder, or "module:attribute" imported lazily
    uses_preference: bool = True  # False: one run stands for every preference (a single Pareto point)
    description: str = ""

    def factory(self) -> Callable[..., Decoder]:
        if callable(self.build):
            return self.build
        module_name, _, attribute = self.build.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"method {self.name!r}: cannot import its factory {self.build!r} ({error})") from error


METHODS: dict[str, Method] = {}


def register_method(name: str, build: Callable[..., Decoder] | str, *, uses_preference: bool = True, description: str = "") -> Method:
    """Add (or replace) the method ``name``; returns its :class:`Method`."""
    if not isinstance(name, str) or not name or "," in name or name != name.strip():
        raise ValueError(f"name must be a non-empty string without commas or surrounding spaces, got {name!r}")
    if not (callable(build) or (isinstance(build, str) and ":" in build)):
        raise TypeError(f"build must be a callable or a 'module:attribute' string, got {build!r}")
    METHODS[name] = Method(name, build, uses_preference, description)
    return METHODS[name]


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods are {sorted(METHODS)}")
    return METHODS[name]


def parse_methods(text: str | list[str]) -> list[str]:
    """``"dualhead,base"`` (or a list, whose items may hold commas too) -> validated, de-duplicated method names in order."""
    items = [text] if isinstance(text, str) else [str(item) for item in text]
    names = [part.strip() for item in items for part in item.split(",")]
    if not names or any(not name for name in names):
        raise ValueError(f"methods must be comma-separated names such as 'dualhead,base', got {text!r}")
    for name in names:
        get_method(name)
    return list(dict.fromkeys(names))


def build_decoder(name: str, model, **options) -> Decoder:
    """A fresh decoder for method ``name`` over ``model`` (a :class:`~paretoalign.model.DualHeadModel`)."""
    return get_method(name).factory()(model, **options)


def trainable_parameters(decoder: Decoder) -> int:
    """Parameters the method had to train: ``decoder.trainable_parameters()`` when it defines one, else every
    ``requires_grad`` parameter of the modules it holds (a frozen backbone counts 0)."""
    own = getattr(decoder, "trainable_parameters", None)
    if callable(own):
        return int(own())
    seen: dict[int, int] = {}
    for value in vars(decoder).values():
        if isinstance(value, torch.nn.Module):
            for parameter in value.parameters():
                if parameter.requires_grad:
                    seen[id(parameter)] = parameter.numel()
    return sum(seen.values())


def _dualhead(
    model,
    strength: float | None = None,
    fusion: str | None = None,
    guidance_top_k: int | None = None,
    compile: bool = False,
    max_new_tokens: int | None = None,
    **options,
) -> Decoder:
    return DualHeadDecoder(model, fusion, strength, guidance_top_k, compile, max_new_tokens)


def _base(model, compile: bool = False, max_new_tokens: int | None = None, **options) -> Decoder:
    return BaseDecoder(model.backbone, compile, max_new_tokens)


register_method("dualhead", _dualhead, description="Dual-Head fusion: the frozen backbone's logits steered by the preference-aware heads")
register_method("base", _base, uses_preference=False, description="the frozen backbone alone")
register_method(
    "genarm", "paretoalign.baselines.genarm:build_decoder",
    description="GenARM: the backbone plus one LoRA autoregressive reward model per objective (1 + k passes per token)",
)
register_method(
    "parm", "paretoalign.baselines.parm:build_decoder",
    description="PARM: the backbone plus one preference-conditioned PBLoRA autoregressive reward model (2 passes per token)",
)
register_method(
    "args", "paretoalign.baselines.args:build_decoder",
    description="ARGS: the backbone's top-k tokens rescored each step by the trajectory-level reward models",
)
register_method(
    "dualhead-unconditioned", "paretoalign.baselines.unconditioned:build_decoder", uses_preference=False,
    description="the Dual-Head as published: reward head and gate that never see the preference (one Pareto point)",
)
