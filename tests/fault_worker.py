"""A sweep or a training run on the tiny model, in its own process, for the SIGKILL tests (tests/test_faults.py).

usage: python tests/fault_worker.py sweep OUT PROMPTS
       python tests/fault_worker.py train OUT DATA FEATURES
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import MarkerScorer, randomize_adapters  # noqa: E402

from paretoalign.model import DualHeadConfig, DualHeadModel  # noqa: E402
from paretoalign.testing import tiny_backbone, tiny_tokenizer  # noqa: E402

torch.set_num_threads(1)
PAUSE = 0.05  # seconds after each batch or step, so that a kill lands mid-run on any machine


def tiny_model(**settings) -> DualHeadModel:
    tokenizer = tiny_tokenizer()
    backbone, _ = tiny_backbone(tokenizer, seed=0)
    torch.manual_seed(0)
    return DualHeadModel(backbone, tokenizer, DualHeadConfig(backbone=backbone.name_or_path, gate_size=16, gate_heads=2, **settings))


def main(kind: str, out: str, *inputs: str) -> None:
    if kind == "sweep":
        from paretoalign.evaluation.sweep import SweepConfig, run_sweep

        model = tiny_model()
        randomize_adapters(model)
        config = SweepConfig(prompts=inputs[0], out=out, methods=["dualhead", "base"], grid=5, max_new_tokens=6, batch_size=2)
        run_sweep(config, model=model.eval(), scorer=MarkerScorer(), progress=False, after_batch=lambda rows: time.sleep(PAUSE))
    elif kind == "train":
        from paretoalign import train as train_module
        from paretoalign.train import TrainConfig, train

        real_loss = train_module.training_loss

        def paced_loss(*args, **kwargs):
            time.sleep(PAUSE)
            return real_loss(*args, **kwargs)

        train_module.training_loss = paced_loss

        config = TrainConfig(
            output_dir=out, backbone="tiny", data_dir=inputs[0], feature_cache=inputs[1], max_train_pairs=16, max_eval_pairs=4,
            steps=12, batch_pairs=3, checkpoint_every=2, eval_every=12, max_length=96, max_prompt_length=64,
            learning_rate=5e-3, warmup_steps=1, model={"gate_size": 16, "gate_heads": 2},
        )
        torch.manual_seed(config.seed)
        tokenizer = tiny_tokenizer()
        backbone, _ = tiny_backbone(tokenizer, seed=0)
        train(config, DualHeadModel(backbone, tokenizer, config.model_config()), progress=False)
    else:
        raise SystemExit(f"unknown kind {kind!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
