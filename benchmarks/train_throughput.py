"""Training steps/s: the frozen backbone every step, the on-disk feature cache, and the cache with candidate tokens.

All three modes train the same heads on the same pairs, interleaved in one run; ratios are against the backbone.
``candidates`` reads the heads out at each response position's label and the LM's ``--candidate-tokens - 1``
likeliest other tokens (``TrainConfig.candidate_tokens``) instead of the whole vocabulary.
"""

from __future__ import annotations

import argparse
import json
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

from paretoalign.backbone import DEFAULT_BACKBONE, load_backbone  # noqa: E402
from paretoalign.batches import (  # noqa: E402
    PairBatch,
    add_pair_sequences,
    collate_candidates,
    collate_pairs,
    sequence_prompt_lengths,
    step_preference,
)
from paretoalign.candidates import build_candidate_cache  # noqa: E402
from paretoalign.data import PreferenceCollator, load_default_pairs, split_pairs  # noqa: E402
from paretoalign.features import build_feature_cache  # noqa: E402
from paretoalign.model import DualHeadModel  # noqa: E402
from paretoalign.testing import tiny_backbone  # noqa: E402
from paretoalign.train import TrainConfig, training_loss  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--tiny", action="store_true", help="a tiny random backbone (smoke run)")
    parser.add_argument("--pairs", type=int, default=48, help="train pairs per objective in the pool")
    parser.add_argument("--batch-pairs", type=int, default=4, help="pairs per objective per step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per repeat and mode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--candidate-tokens", type=int, default=64, help="C of the candidates mode")
    parser.add_argument("--tail-samples", type=int, default=64, help="S tail samples per position in the candidates mode")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone, tokenizer = tiny_backbone() if args.tiny else load_backbone(args.backbone)
    config = TrainConfig(backbone=args.backbone, batch_pairs=args.batch_pairs, max_length=320, max_prompt_length=192)
    torch.manual_seed(0)
    model = DualHeadModel(backbone, tokenizer, config.model_config()).train()
    collator = PreferenceCollator(tokenizer, config.max_length, config.max_prompt_length)
    pools = load_default_pairs()
    pairs = {name: split_pairs(pools[name])["train"][: args.pairs] for name in config.objectives}

    # The same pairs two ways: packed in a feature cache, and as token ids for the backbone.
    sequences: list[list[int]] = []
    indices = {name: add_pair_sequences(collator, chosen_pairs, sequences) for name, chosen_pairs in pairs.items()}
    with tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        cache = build_feature_cache(model, sequences, root, progress=False)
        cache_seconds = time.perf_counter() - started
        prompt_lengths = sequence_prompt_lengths(list(indices.values()), len(sequences))
        started = time.perf_counter()
        candidates = build_candidate_cache(
            backbone.get_output_embeddings(), cache, prompt_lengths, args.candidate_tokens, args.tail_samples, progress=False
        )
        candidate_seconds = time.perf_counter() - started
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step_pair_ids(step):  # the same pairs for both modes at a given step
            return [np.random.default_rng([step, i]).choice(args.pairs, args.batch_pairs, replace=False) for i in range(len(pairs))]

        def cached_batches(step):
            ids = step_pair_ids(step)
            return [collate_pairs(cache, indices[name], ids[i]) for i, name in enumerate(config.objectives)]

        def candidate_batches(step):
            batches = cached_batches(step)
            for batch, name, ids in zip(batches, config.objectives, step_pair_ids(step)):
                batch.candidates = collate_candidates(candidates, indices[name], ids)
            return batches

        def backbone_batches(step):
            ids = step_pair_ids(step)
            batches = []
            for i, name in enumerate(config.objectives):
                batch = collator([pairs[name][j] for j in ids[i]])
                sides = ("chosen", "rejected")
                input_ids = torch.cat([batch[f"{s}_input_ids"] for s in sides])  # (2B, T)
                attention_mask = torch.cat([batch[f"{s}_attention_mask"] for s in sides])  # (2B, T)
                response_mask = torch.cat([batch[f"{s}_response_mask"] for s in sides])  # (2B, T)
                with torch.no_grad():
                    hidden = model.backbone_hidden(input_ids, attention_mask)  # (2B, T, d)
                batches.append(PairBatch(hidden, input_ids, attention_mask, response_mask))
            return batches

        def run(make_batches, first_step) -> float:
            started = time.perf_counter()
            for step in range(first_step, first_step + args.steps):
                preference = step_preference(len(config.objectives), step, 0, 1.0)
                loss, _ = training_loss(model, make_batches(step), preference, config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return args.steps / (time.perf_counter() - started)

        modes = {"backbone": backbone_batches, "cached": cached_batches, "candidates": candidate_batches}
        for make in modes.values():
            run(make, 0)  # warm-up
        rates = {mode: [] for mode in modes}
        for repeat in range(args.repeats):
            order = list(modes) if repeat % 2 == 0 else list(modes)[::-1]  # alternate to cancel drift
            for mode in order:
                rates[mode].append(run(modes[mode], 100 * (repeat + 1)))
    cached, every_step, sparse = (statistics.median(rates[mode]) for mode in ("cached", "backbone", "candidates"))
    result = {
        "backbone": "tiny" if args.tiny else args.backbone,
        "batch_pairs_per_objective": args.batch_pairs,
        "candidate_tokens": args.candidate_tokens,
        "tail_samples": args.tail_samples,
        "cached_steps_per_s": cached,
        "backbone_steps_per_s": every_step,
        "candidates_steps_per_s": sparse,
        "speedup": cached / every_step,
        "candidates_speedup": sparse / every_step,
        "cache_build_seconds": cache_seconds,
        "candidate_cache_build_seconds": candidate_seconds,
        "sequences_cached": len(sequences),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"backbone {result['backbone']}, {args.batch_pairs} pairs per objective per step, median of {args.repeats} x {args.steps} steps")
    print(f"{'mode':<36}{'steps/s':>10}{'vs backbone':>14}")
    print(f"{'backbone every step':<36}{every_step:>10.3f}{1.0:>13.2f}x")
    print(f"{'from the feature cache':<36}{cached:>10.3f}{result['speedup']:>13.2f}x")
    print(f"{f'cache + {args.candidate_tokens} candidates + {args.tail_samples} tail':<36}{sparse:>10.3f}{result['candidates_speedup']:>13.2f}x")
    print(f"(building the feature cache of {len(sequences)} sequences took {cache_seconds:.1f} s once, the candidates {candidate_seconds:.1f} s)")


if __name__ == "__main__":
    main()
