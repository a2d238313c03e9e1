"""Which reward *form* can the frozen backbone's features support? Linear probes on the training cache.

An ARM's reward is a sum (or mean) of per-token log-prob changes chosen *before* each token is read, while a
sequence classifier pools the states *after* reading the reply. This script fits L2-regularised Bradley–Terry
probes (logistic regression on chosen − rejected features, the L2 weight picked by 5-fold cross-validation on
the training pairs) over the default config's cached final hidden states and reports validation accuracy for:

- ``pool``: mean of the response's hidden states (a sequence classifier; an upper bound for a linear head);
- ``tok``: Σ_t (e_{y_t} − E_{π_LM}[e]) — the first-order reward of a context-free token reward read through the
  (tied) embedding, i.e. the linearised ``hidden`` reward head with a constant input;
- ``bilinear``: Σ_t (e_{y_t} − E_{π_LM}[e]) ⊗ h_{t-1} in ``--rank`` principal directions each — the linearised
  ``hidden`` head (Δ logits = E·M·h);

each summed over the response (GenARM's ``reward_reduction`` "sum") and averaged ("mean"), plus the two
one-feature rules "the base LM's log-likelihood is higher" and "the longer reply wins".

    python benchmarks/arm_form_probe.py [--config configs/default.json] [--rank 48] [--train-pairs 375,750,1500]

``--train-pairs`` fits every probe on n training pairs (a seeded random subset) of each objective too (one row per n), which shows
how a form's validation accuracy grows with data.

Needs the config's feature cache (``paretoalign train --config ...`` builds it; a missing cache is built first,
31 min on 2 CPU cores). Takes ~8 min on 2 CPU cores for 1,500 + 200 pairs per objective.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from paretoalign.backbone import load_backbone
from paretoalign.model import DualHeadModel
from paretoalign.train import TrainConfig, prepare_data


def sequence_features(cache, embedding: torch.Tensor, sequence: int, prompt_length: int):
    """Hidden states predicting the response tokens ``(n, d)``, centred token embeddings ``(n, d)``, log-likelihood."""
    tokens, states = cache.sequence(sequence)
    tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    states = torch.from_numpy(np.asarray(states, dtype=np.float32))
    before, targets = states[prompt_length - 1 : -1], tokens[prompt_length:]  # (n, d), (n,)
    probs = torch.softmax(before @ embedding.T, dim=-1)  # (n, V)
    centred = embedding[targets] - probs @ embedding  # (n, d) e_y - E_pi[e]
    loglik = torch.log(probs.gather(1, targets[:, None])).sum()
    return before, centred, loglik


L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 3.0, 10.0)  # the per-token forms need the strong end to stop memorising


def fit_logistic(x: torch.Tensor, l2: float) -> torch.Tensor:
    """Bradley–Terry weights on pair differences ``x`` (P, D): minimise mean softplus(−x·w) + l2·|w|²."""
    weights = torch.zeros(x.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.softplus(-x @ weights).mean() + l2 * weights @ weights
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach()


def probe(train: torch.Tensor, validation: torch.Tensor) -> tuple[float, float, float]:
    """(cross-validated accuracy, chosen L2, validation accuracy) of a probe on standardised differences."""
    scale = train.std(0) + 1e-6
    train, validation = train / scale, validation / scale
    folds = torch.arange(len(train)) % 5
    best = (-1.0, 0.0)
    for l2 in L2_GRID:
        accuracies = [((train[folds == f] @ fit_logistic(train[folds != f], l2)) > 0).float().mean().item() for f in range(5)]
        best = max(best, (float(np.mean(accuracies)), l2))
    weights = fit_logistic(train, best[1])
    return best[0], best[1], ((validation @ weights) > 0).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.json")
    parser.add_argument("--rank", type=int, default=48, help="principal directions of h and of e_y - E[e] (bilinear)")
    parser.add_argument("--train-pairs", default=None, help="comma-separated training-set sizes to fit on as well (default: all)")
    args = parser.parse_args()
    try:
        sizes = sorted({int(n) for n in args.train_pairs.split(",")}) if args.train_pairs else []
    except ValueError:
        raise SystemExit(f"--train-pairs must be comma-separated integers, got {args.train_pairs!r}") from None
    if any(n < 10 for n in sizes):
        raise SystemExit(f"--train-pairs: every size must be at least 10 pairs, got {args.train_pairs!r}")
    torch.manual_seed(0)
    config = TrainConfig.from_json(args.config)
    backbone, tokenizer = load_backbone(config.backbone)
    model = DualHeadModel(backbone, tokenizer, config.model_config())
    data = prepare_data(config, model, progress=True)
    embedding = backbone.get_output_embeddings().weight.detach().float()  # (V, d)
    start = time.perf_counter()
    with torch.no_grad():
        sample = [
            sequence_features(data.cache, embedding, int(index.chosen[i]), int(index.prompt_length[i]))
            for index in data.train.values()
            for i in range(min(100, len(index.chosen)))
        ]
        states, centred = torch.cat([s[0] for s in sample]), torch.cat([s[1] for s in sample])
        state_mean = states.mean(0)
        state_basis = torch.linalg.svd(states - state_mean, full_matrices=False)[2][: args.rank].T  # (d, r)
        token_basis = torch.linalg.svd(centred, full_matrices=False)[2][: args.rank].T  # (d, r)
        features: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for split, indices in (("train", data.train), ("validation", data.validation)):
            for objective, index in indices.items():
                rows: dict[str, list[torch.Tensor]] = {name: [] for name in ("pool", "tok", "bilinear", "loglik", "length")}
                for pair in range(len(index.chosen)):
                    for sequence in (index.chosen[pair], index.rejected[pair]):
                        before, centred, loglik = sequence_features(data.cache, embedding, int(sequence), int(index.prompt_length[pair]))
                        projected = centred @ token_basis  # (n, r)
                        rows["pool"].append(before.mean(0))
                        rows["tok"].append(centred.sum(0))
                        rows["bilinear"].append(torch.cat([((before - state_mean) @ state_basis).T @ projected, projected.sum(0, keepdim=True)]).flatten())
                        rows["loglik"].append(loglik.reshape(1))
                        rows["length"].append(torch.tensor([float(len(before))]))
                features[(split, objective)] = {name: torch.stack(values) for name, values in rows.items()}
                print(f"features: {split} {objective} ({len(index.chosen)} pairs, {time.perf_counter() - start:.0f} s)", flush=True)
    print("\n| objective | feature | reduction | dim | train pairs | CV acc. (train) | L2 | validation acc. |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for objective in config.objectives:
        train, validation = features[("train", objective)], features[("validation", objective)]
        for rule in ("loglik", "length"):
            wins = [(differences(side, rule, "sum")[:, 0] > 0).float().mean().item() for side in (train, validation)]
            print(f"| {objective} | rule: higher {rule} wins | - | 1 | {len(train['length']) // 2} | {wins[0]:.3f} | - | {wins[1]:.3f} |")
        for name, reduction in (("pool", "mean"), ("tok", "sum"), ("tok", "mean"), ("bilinear", "sum"), ("bilinear", "mean")):
            x_train = differences(train, name, "sum" if name == "pool" else reduction)  # pool is a mean already
            x_validation = differences(validation, name, "sum" if name == "pool" else reduction)
            order = torch.from_numpy(np.random.default_rng(0).permutation(len(x_train)))  # a seeded subset per size
            for n in [size for size in sizes if size < len(x_train)] + [len(x_train)]:
                cv, l2, accuracy = probe(x_train[order[:n]], x_validation)
                print(f"| {objective} | {name} | {reduction} | {x_train.shape[1]} | {n} | {cv:.3f} | {l2:g} | {accuracy:.3f} |", flush=True)


def differences(features: dict[str, torch.Tensor], name: str, reduction: str) -> torch.Tensor:
    """Chosen − rejected ``(P, D)`` of per-sequence features (rows alternate chosen, rejected), summed or averaged."""
    values = features[name]
    if reduction == "mean":
        values = values / features["length"]
    return values[0::2] - values[1::2]


if __name__ == "__main__":
    main()
