"""Shared fixtures: tiny randomly initialised Llama backbones (fast, CPU, offline)."""

import gzip
import json

import numpy as np
import pytest
import torch

from paretoalign.data import DATA_DIR
from paretoalign.model import DualHeadConfig, DualHeadModel
from paretoalign.testing import tiny_backbone, tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def backbone(tokenizer):
    model, _ = tiny_backbone(tokenizer, seed=0)
    return model


def randomize_adapters(model: torch.nn.Module, seed: int = 1, scale: float = 0.5) -> None:
    """Give every zero-initialised lora_B random values so the heads actually change the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lora_B") or ".lora_B." in name:  # ours, and peft's "lora_B.default.weight"
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


@pytest.fixture
def make_model(backbone, tokenizer):
    def factory(randomize: bool = True, **overrides) -> DualHeadModel:
        torch.manual_seed(0)
        settings = {"backbone": backbone.name_or_path, "gate_size": 16, "gate_heads": 2, **overrides}
        config = DualHeadConfig(**settings)
        model = DualHeadModel(backbone, tokenizer, config)
        if randomize:
            randomize_adapters(model)
        return model.eval()

    return factory


class MarkerScorer:
    """A deterministic reward scorer: each objective's reward is how often its marker string occurs in the reply.

    A real scorer (the input ARGS is guided by), not a stand-in for one; it records the prompts it was shown.
    """

    def __init__(self, markers: dict[str, str] | None = None, objectives=("helpfulness", "harmlessness")):
        self.objectives = tuple(objectives)
        self.markers = dict(markers or {"helpfulness": "e", "harmlessness": "a"})
        self.prompts: list = []

    def score(self, prompts, responses, batch_size=32):
        self.prompts.extend(prompts)
        markers = [self.markers.get(name) for name in self.objectives]  # None: the objective earns nothing
        counts = [[response.count(marker) if marker else 0 for marker in markers] for response in responses]
        return np.asarray(counts, dtype=np.float64).reshape(len(responses), len(self.objectives))

    def describe(self):
        return {"kind": "markers", "objectives": list(self.objectives), "markers": self.markers}


@pytest.fixture(scope="session")
def baseline_root(backbone, tokenizer, tmp_path_factory):
    """Random (untrained) checkpoints of every baseline that needs one, for the tiny backbone."""
    from paretoalign.baselines.arm import ARMConfig, new_arm, save_arm
    from paretoalign.baselines.unconditioned import UnconditionedDualHeadModel

    root = tmp_path_factory.mktemp("baselines")
    objectives = DualHeadConfig().objectives
    for seed, (method, scored, name) in enumerate(
        [("genarm", [objective], f"genarm-{objective}") for objective in objectives] + [("parm", objectives, "parm")]
    ):
        config = ARMConfig.for_backbone(method, scored, backbone, tokenizer, layers=1)
        torch.manual_seed(seed)
        arm = new_arm(backbone, config)
        randomize_adapters(arm, seed=seed + 2)
        save_arm(arm, config, root / name)
    torch.manual_seed(0)
    config = DualHeadConfig(backbone=backbone.name_or_path, reward_head="lora", gate_size=16, gate_heads=2)
    heads = UnconditionedDualHeadModel(backbone, tokenizer, config)
    randomize_adapters(heads)
    heads.save_pretrained(root / "dualhead-unconditioned")
    return root


@pytest.fixture
def baseline_checkpoints(baseline_root, monkeypatch):
    """Every registered method builds on the tiny model: the baselines' checkpoints come from ``baseline_root`` and
    ARGS is guided by a :class:`MarkerScorer` instead of the shipped scorer."""
    monkeypatch.setenv("PARETOALIGN_BASELINE_CHECKPOINTS", str(baseline_root))
    monkeypatch.setattr("paretoalign.scorers.rewards.load_scorer", lambda spec=None, device=None, **kwargs: MarkerScorer())
    return baseline_root


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The first 24 real pairs of each vendored HH-RLHF file and of PKU-SafeRLHF."""
    root = tmp_path_factory.mktemp("data")
    (root / "hh-rlhf").mkdir()
    for name in ("helpful-base", "helpful-online", "helpful-rejection-sampled", "harmless-base"):
        with gzip.open(DATA_DIR / "hh-rlhf" / f"{name}.jsonl.gz", "rt") as source:
            lines = [next(source) for _ in range(24)]
        with gzip.open(root / "hh-rlhf" / f"{name}.jsonl.gz", "wt") as target:
            target.writelines(lines)
    (root / "pku-saferlhf").mkdir()
    records = json.loads((DATA_DIR / "pku-saferlhf" / "safer-pairs.json").read_text())[:24]
    (root / "pku-saferlhf" / "safer-pairs.json").write_text(json.dumps(records))
    return root
