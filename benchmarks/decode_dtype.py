"""Decoding in bf16 against fp32, side by side: speed, the memory-bandwidth bound, and whether the answers stay right.

Speed: tokens/s of HF ``generate`` (fp32, the anchor), Dual-Head in fp32 and Dual-Head with a bf16 backbone (the heads
stay fp32), the same prompts interleaved batch by batch, every row forced to ``--max-new-tokens``. The bound: the
machine's measured memory bandwidth divided by the bytes of weights a decoding step reads.

Quality: Dual-Head's fp32 greedy answers to the prompts at three preferences are read back teacher-forced by the bf16
model (fused logits restricted to the guidance top-k, as decoding does); the share of answer positions where bf16
picks the same next token is the target (>= 99 %). Free-running answers drift apart after one flip, so the share of
identical bf16 answers is reported too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
for path in (REPO_ROOT, BENCHMARKS):  # run as a script from a checkout without installing the package
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from decode_throughput import PROMPTS, batches_for, run_method  # noqa: E402

from paretoalign.generation import generate, prepare_batch  # noqa: E402
from paretoalign.model import load_model, restrict_to_base_top_k  # noqa: E402

PREFERENCES = ([1.0, 0.0], [0.5, 0.5], [0.0, 1.0])
AGREEMENT_TARGET = 0.99
VARIANTS = ("hf_generate fp32", "dualhead fp32", "dualhead bf16")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=None, help="Dual-Head checkpoint (default: the shipped one)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated (default: 1,8)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per timed run and batch size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quality-tokens", type=int, default=48, help="new tokens of the answers checked for agreement")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def memory_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of reading a large fp32 tensor once (the best of ``repeats`` sums)."""
    data = torch.ones(int(gigabytes * 2**30 / 4))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


def weight_bytes(model) -> int:
    """Bytes a decoding step reads: every backbone weight except the input embedding (one row of it is read; with
    tied embeddings the LM head reads the matrix once, as itself)."""
    backbone = model.backbone
    embedding = backbone.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in backbone.parameters())
    tied = backbone.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    return total if tied else total - embedding.numel() * embedding.element_size()


@torch.no_grad()
def run(variant: str, models: dict, prompts, preference, new_tokens: int) -> int:
    """Tokens decoded by ``variant`` (``"<method> <dtype>"``), every row forced to ``new_tokens``."""
    method, dtype = variant.split()
    count, _ = run_method(models[dtype], prompts, preference, method, argparse.Namespace(max_new_tokens=new_tokens, allow_eos=False))
    return count


def speed(models: dict, batch_size: int, args) -> dict:
    batches = batches_for(batch_size, args.prompts)
    preference = PREFERENCES[1]
    for variant in VARIANTS:  # warm-up
        run(variant, models, batches[0], preference, 2)
    elapsed = {v: 0.0 for v in VARIANTS}
    tokens = {v: 0 for v in VARIANTS}
    for repeat in range(args.repeats):
        for index, prompts in enumerate(batches):
            shift = (repeat + index) % len(VARIANTS)  # rotate the order so drift hits every variant alike
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                start = time.perf_counter()
                tokens[variant] += run(variant, models, prompts, preference, args.max_new_tokens)
                elapsed[variant] += time.perf_counter() - start
    return {v: tokens[v] / elapsed[v] for v in VARIANTS}


@torch.no_grad()
def teacher_forced(model, prompts, preference, answers) -> tuple[int, int]:
    """(positions where ``model``'s guided greedy choice equals the answer's token, positions) over ``answers``."""
    top_k = model.config.guidance_top_k
    same = positions = 0
    for prompt, answer in zip(prompts, answers):
        if not answer.token_ids:
            continue
        _, ids, mask, rows, _ = prepare_batch(model, [prompt], preference)
        reply = torch.tensor([answer.token_ids], device=ids.device)
        prompt_mask = torch.cat([mask, torch.zeros_like(reply)], dim=1)  # the head's prompt context: the prompt alone, as decoding
        out = model(torch.cat([ids, reply], dim=1), torch.cat([mask, torch.ones_like(reply)], dim=1), rows, prompt_mask=prompt_mask)
        span = slice(ids.shape[1] - 1, ids.shape[1] - 1 + reply.shape[1])  # the logits at position t choose token t + 1
        chosen = restrict_to_base_top_k(out.logits[0, span].float(), out.lm_logits[0, span].float(), top_k).argmax(-1)
        same += int((chosen == reply[0]).sum())
        positions += reply.shape[1]
    return same, positions


def agreement(models: dict, args) -> dict:
    """Teacher-forced next-token agreement with fp32's greedy answers (bf16, and fp32 itself as the measurement's
    floor: a whole-sequence pass against the step-by-step decode), and identical free-running answers."""
    counts = {"fp32": [0, 0], "bf16": [0, 0]}
    identical = answers = 0
    for preference in PREFERENCES:
        # the loop guard off: teacher forcing reads the model's own next-token choice, which the guard would overrule
        exact = generate(models["fp32"], PROMPTS, preference, max_new_tokens=args.quality_tokens, temperature=0, no_repeat_ngram_size=0)
        rounded = generate(models["bf16"], PROMPTS, preference, max_new_tokens=args.quality_tokens, temperature=0, no_repeat_ngram_size=0)
        identical += sum(a.token_ids == b.token_ids for a, b in zip(exact, rounded))
        answers += len(exact)
        for name, model in models.items():
            same, positions = teacher_forced(model, PROMPTS, preference, exact)
            counts[name][0] += same
            counts[name][1] += positions
    return {
        "teacher_forced_agreement": counts["bf16"][0] / counts["bf16"][1],
        "fp32_self_agreement": counts["fp32"][0] / counts["fp32"][1],
        "positions": counts["bf16"][1],
        "identical_answers": identical / answers,
        "answers": answers,
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {"fp32": load_model(args.checkpoint, dtype="float32"), "bf16": load_model(args.checkpoint, dtype="bfloat16")}
    bandwidth = memory_bandwidth()
    bounds = {name: bandwidth / weight_bytes(model) for name, model in models.items()}
    rates = {size: speed(models, size, args) for size in (int(s) for s in args.batch_sizes.split(","))}
    quality = agreement(models, args)
    result = {
        "threads": torch.get_num_threads(),
        "bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "bound_tokens_per_s_batch1": {name: round(value, 1) for name, value in bounds.items()},
        "tokens_per_s": {size: {v: round(r, 1) for v, r in rate.items()} for size, rate in rates.items()},
        "quality": quality,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['threads']} threads, memory read {result['bandwidth_gb_s']} GB/s; batch-1 bound fp32 {bounds['fp32']:.1f} tok/s, bf16 {bounds['bf16']:.1f} tok/s")
    for size, rate in rates.items():
        hf, fp32, bf16 = (rate[v] for v in VARIANTS)
        print(f"batch {size}: HF generate fp32 {hf:.1f} tok/s, Dual-Head fp32 {fp32:.1f}, Dual-Head bf16 {bf16:.1f}")
        print(f"  Dual-Head bf16 / HF generate fp32 {bf16 / hf:.2f}x (target >= 2 at batch 1), bf16 / fp32 {bf16 / fp32:.2f}x")
        if size == 1:
            print(f"  share of the bound: fp32 {fp32 / bounds['fp32']:.2f}, bf16 {bf16 / bounds['bf16']:.2f} (target >= 0.5)")
    verdict = "PASS" if quality["teacher_forced_agreement"] >= AGREEMENT_TARGET else "FAIL"
    print(
        f"quality: teacher-forced next-token agreement {quality['teacher_forced_agreement']:.4f} over {quality['positions']} positions "
        f"(target >= {AGREEMENT_TARGET}: {verdict}; fp32 read back by itself: {quality['fp32_self_agreement']:.4f}); identical free-running answers {quality['identical_answers']:.2f} of {quality['answers']}"
    )


if __name__ == "__main__":
    main()
