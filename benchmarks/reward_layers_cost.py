"""Decode cost of the reward branch: Dual-Head tokens/s with ``reward_layers`` k = 0, 2, 4 (and the plain backbone),
timed side by side in one run, with each one's ratio to k = 0 and the block-count estimate ``1 / (1 + k/N)``
(the branch also reads its state out through the vocabulary projection once more per token, which the estimate leaves out).

The heads are freshly initialised: the cost of a decoding step does not depend on the adapters' values.

    python benchmarks/reward_layers_cost.py                 # the default backbone, batch sizes 1 and 8
    python benchmarks/reward_layers_cost.py --tiny --json   # a tiny random backbone (smoke run)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "benchmarks"):  # run as a script from a checkout without installing the package
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from decode_throughput import batches_for, parse_batch_sizes, positive_int, run_loop  # noqa: E402

from paretoalign.backbone import DEFAULT_BACKBONE, load_backbone  # noqa: E402
from paretoalign.model import DualHeadConfig, DualHeadModel  # noqa: E402


def parse_layers(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be comma-separated integers, got {text!r}") from None
    if not values or any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"--layers must be integers >= 0, got {text!r}")
    return sorted(set(values))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="backbone id or path (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random 4-block backbone (fast smoke run)")
    parser.add_argument("--layers", type=parse_layers, default=[0, 2, 4], help="reward_layers values (default: 0,2,4)")
    parser.add_argument("--batch-sizes", type=parse_batch_sizes, default=[1, 8], help="comma-separated (default: 1,8)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=48, help="new tokens per row (default: %(default)s)")
    parser.add_argument("--prompts", type=positive_int, default=8, help="prompts per timed run (default: %(default)s)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed repeats; the median is reported")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    return parser


def build_models(args) -> tuple[dict[int, DualHeadModel], int]:
    if args.tiny:
        from paretoalign.testing import tiny_backbone

        backbone, tokenizer = tiny_backbone(num_layers=4)
    else:
        backbone, tokenizer = load_backbone(args.backbone)
    blocks = backbone.config.num_hidden_layers
    too_deep = [k for k in args.layers if k > blocks]
    if too_deep:
        raise SystemExit(f"--layers {too_deep} exceed the backbone's {blocks} blocks")
    models = {}
    for k in args.layers:
        torch.manual_seed(0)
        config = DualHeadConfig(backbone=backbone.name_or_path, reward_layers=k)
        models[k] = DualHeadModel(backbone, tokenizer, config).eval()
    return models, blocks


@torch.no_grad()
def bench(models: dict[int, DualHeadModel], batch_size: int, args) -> dict:
    """Median tokens/s per configuration, the methods interleaved batch by batch with a rotating order."""
    runs = [("base", 0), *((f"dualhead k={k}", k) for k in models)]
    first = next(iter(models.values()))
    batches = batches_for(batch_size, args.prompts)
    preference = [0.5, 0.5]
    options = argparse.Namespace(allow_eos=False, max_new_tokens=args.max_new_tokens)
    for name, k in runs:  # warm-up
        run_loop(models[k] if name != "base" else first, batches[0], preference, name.split()[0], options)
    rates = {name: [] for name, _ in runs}
    for repeat in range(args.repeats):
        elapsed = {name: 0.0 for name, _ in runs}
        tokens = {name: 0 for name, _ in runs}
        for index, prompts in enumerate(batches):
            shift = (repeat + index) % len(runs)
            for name, k in runs[shift:] + runs[:shift]:
                model = first if name == "base" else models[k]
                start = time.perf_counter()
                count, _ = run_loop(model, prompts, preference, name.split()[0], options)
                elapsed[name] += time.perf_counter() - start
                tokens[name] += count
        for name, _ in runs:
            rates[name].append(tokens[name] / elapsed[name])
    return {name: statistics.median(values) for name, values in rates.items()}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models, blocks = build_models(args)
    reference = f"dualhead k={min(models)}"
    results = {"backbone": "tiny" if args.tiny else args.backbone, "blocks": blocks, "threads": torch.get_num_threads(), "batch_sizes": {}}
    for batch_size in args.batch_sizes:
        rates = bench(models, batch_size, args)
        print(f"\nbatch size {batch_size}, {args.max_new_tokens} new tokens per row, {args.prompts} prompts, median of {args.repeats}")
        print(f"{'method':<16}{'tokens/s':>10}{'vs ' + reference:>18}{'expected 1/(1+k/N)':>20}")
        rows = {}
        for name, rate in rates.items():
            ratio = rate / rates[reference]
            expected = None  # the backbone alone has no heads: no block-count estimate
            if name != "base":
                k = int(name.split("=")[1])
                expected = (1 + min(models) / blocks) / (1 + k / blocks)
            shown = "-" if expected is None else f"{expected:.3f}"
            print(f"{name:<16}{rate:>10.1f}{ratio:>18.3f}{shown:>20}")
            rows[name] = {"tokens_per_s": round(rate, 2), "ratio": round(ratio, 4), "expected_ratio": expected and round(expected, 4)}
        results["batch_sizes"][str(batch_size)] = rows
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
