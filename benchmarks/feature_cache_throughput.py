"""Feature caching (the backbone's prefill over training sequences): fp32 against bf16 matmuls, side by side.

Builds the feature cache of the same held-out pairs' sequences with ``compute_dtype="float32"`` and ``"bfloat16"``
(each into its own empty folder, so nothing is copied from another cache), alternating the order over
``--repeats``, and prints tokens/s of each, their ratio, how far the bf16 states lie from the fp32 ones, and the
reward head's pairwise accuracy read from each cache (the quality target: it moves by at most 0.01).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout without installing the package
    sys.path.insert(0, str(REPO_ROOT))

from paretoalign.batches import add_pair_sequences  # noqa: E402
from paretoalign.data import PreferenceCollator, load_default_pairs, split_pools  # noqa: E402
from paretoalign.features import build_feature_cache  # noqa: E402
from paretoalign.model import load_model  # noqa: E402
from paretoalign.objective import arm_accuracy  # noqa: E402
from paretoalign.testing import tiny_backbone  # noqa: E402

DTYPES = ("float32", "bfloat16")
ACCURACY_TOLERANCE = 0.01


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=None, help="Dual-Head checkpoint (default: the shipped one)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random backbone and untrained heads (smoke run)")
    parser.add_argument("--pairs", type=int, default=120, help="test pairs per objective (a seeded sample)")
    parser.add_argument("--repeats", type=int, default=2, help="builds per dtype, order alternating")
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        from paretoalign.model import DualHeadConfig, DualHeadModel

        backbone, tokenizer = tiny_backbone()
        model = DualHeadModel(backbone, tokenizer, DualHeadConfig(backbone="tiny", gate_size=16, gate_heads=2)).eval()
    else:
        model = load_model(args.checkpoint)
    splits = split_pools(load_default_pairs())
    pairs = {
        objective: random.Random(0).sample(splits[objective]["test"], min(args.pairs, len(splits[objective]["test"])))
        for objective in model.objectives
        if objective in splits
    }
    collator = PreferenceCollator(model.tokenizer, 512, 384)  # as arm_accuracy reads them, so it finds these caches
    sequences: list[list[int]] = []
    for group in pairs.values():
        add_pair_sequences(collator, group, sequences)
    tokens = sum(len(s) for s in sequences)
    seconds: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
    caches = {}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for dtype in DTYPES if repeat % 2 == 0 else DTYPES[::-1]:
                root = Path(scratch) / f"{dtype}-{repeat}"
                start = time.perf_counter()
                caches[dtype] = build_feature_cache(model, sequences, root, args.max_batch_tokens, progress=False, compute_dtype=dtype)
                seconds[dtype].append(time.perf_counter() - start)
        errors = []
        for i in range(len(sequences)):
            exact, rounded = (np.asarray(caches[dtype].sequence(i)[1], np.float32) for dtype in DTYPES)
            errors.append(np.linalg.norm(rounded - exact, axis=-1) / np.maximum(np.linalg.norm(exact, axis=-1), 1e-6))
        errors = np.concatenate(errors)
        one_hots = [[1.0 if j == i else 0.0 for j in range(len(model.objectives))] for i in range(len(model.objectives))]
        accuracy = {}
        for dtype in DTYPES:
            root = caches[dtype].directory.parent
            accuracy[dtype] = {
                objective: [round(r["accuracy"], 4) for r in arm_accuracy(model, group, one_hots, feature_cache=root, feature_dtype=dtype)]
                for objective, group in pairs.items()
            }
    rate = {dtype: tokens / statistics.median(seconds[dtype]) for dtype in DTYPES}
    shift = max(abs(a - b) for objective in pairs for a, b in zip(accuracy["float32"][objective], accuracy["bfloat16"][objective]))
    result = {
        "sequences": len(sequences),
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "tokens_per_s": {dtype: round(value, 1) for dtype, value in rate.items()},
        "ratio_bf16_over_fp32": round(rate["bfloat16"] / rate["float32"], 2),
        "state_relative_error": {"mean": float(errors.mean()), "p99": float(np.quantile(errors, 0.99))},
        "accuracy_at_one_hots": accuracy,
        "largest_accuracy_change": round(shift, 4),
        "accuracy_within_tolerance": shift <= ACCURACY_TOLERANCE,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{len(sequences)} sequences, {tokens} tokens, {result['threads']} threads")
    for dtype in DTYPES:
        print(f"  {dtype:9s} {rate[dtype]:8.1f} tokens/s  (builds: {', '.join(f'{s:.1f} s' for s in seconds[dtype])})")
    print(f"  bf16 / fp32: {result['ratio_bf16_over_fp32']:.2f}x (target >= 2x)")
    print(f"  bf16 states vs fp32: relative error mean {errors.mean():.4f}, p99 {np.quantile(errors, 0.99):.4f}")
    for objective in pairs:
        print(f"  {objective}: accuracy at the one-hots fp32 {accuracy['float32'][objective]}, bf16 {accuracy['bfloat16'][objective]}")
    print(f"  largest accuracy change {shift:.4f} (target <= {ACCURACY_TOLERANCE})")


if __name__ == "__main__":
    main()
