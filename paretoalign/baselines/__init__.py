"""Reference decoding methods (GenARM, PARM, ARGS, the Dual-Head as published) behind the one ``Decoder`` interface.

Each method's module has a ``build_decoder(model, strength=..., fusion=..., **options)`` factory, registered by name
in :mod:`paretoalign.methods`, so a Pareto sweep runs them like the preference-aware Dual-Head:

- ``genarm``: one LoRA autoregressive reward model per objective; ``1 + k`` model passes per token for ``k`` objectives;
- ``parm``: one preference-conditioned PBLoRA autoregressive reward model; 2 model passes per token;
- ``args``: the trajectory-level reward models rescore the top-k tokens; 1 pass, plus the scorer's over ``k`` texts a row;
- ``dualhead-unconditioned``: reward head and gate that never see the preference; 1 pass per token.

``paretoalign train-arm --method genarm|parm|dualhead-unconditioned`` trains their weights
(:mod:`~paretoalign.baselines.arm_training`, :mod:`~paretoalign.baselines.unconditioned`).
"""

from .arm import ARMConfig, LoRASettings, checkpoint_root, default_checkpoint

__all__ = ["ARMConfig", "LoRASettings", "checkpoint_root", "default_checkpoint"]
