"""Training on cached candidate tokens: the renormalisation by hand, the heads' shortcut, and the trainer end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import fresh_model, make_config

from paretoalign.candidates import build_candidate_cache, position_candidates
from paretoalign.losses import candidate_label_logprobs, label_logprobs
from paretoalign.objective import score_pairs
from paretoalign.pblora import PBLoRALinear
from paretoalign.train import prepare_data, train, training_loss


def test_candidate_label_logprobs_by_hand():
    # Vocabulary of 4 with logits z = (1, 2, 0, -1); label 2; candidates (2, 1) shifted by (0.5, -1); tokens 0 and 3 untouched.
    z = torch.tensor([1.0, 2.0, 0.0, -1.0])
    base = torch.log_softmax(z, -1)
    candidates = torch.tensor([2, 1])
    tail = torch.log(torch.exp(base[0]) + torch.exp(base[3]))
    got = candidate_label_logprobs(base[candidates][None], tail[None], torch.tensor([[0.5, -1.0]]))
    by_hand = 0.5 - math.log(math.exp(1) + math.exp(2 - 1) + math.exp(0 + 0.5) + math.exp(-1))
    assert got.item() == pytest.approx(by_hand, abs=1e-6)


def test_candidate_label_logprobs_are_exact_when_the_rest_is_unshifted():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 30, generator=generator) * 3  # (N, V)
    labels = torch.randint(0, 30, (5,), generator=generator)
    ids, base, tail = position_candidates(logits, labels, 7)
    change = torch.randn(5, 7, generator=generator)
    full = torch.zeros(5, 30).scatter(-1, ids, change)  # the same change, zero outside the candidates
    torch.testing.assert_close(candidate_label_logprobs(base, tail, change), label_logprobs(logits + full, labels))


def test_tail_samples_make_a_constant_tail_shift_exact_and_estimate_a_varying_one():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 50, generator=generator) * 2  # (N, V)
    labels = torch.randint(0, 50, (4,), generator=generator)
    ids, base, tail = position_candidates(logits, labels, 6, tail_samples=3, generator=generator)
    assert ids.shape == (4, 9)
    for row in ids:  # samples come from the tail, never from the candidates
        assert not set(row[6:].tolist()) & set(row[:6].tolist())
    change = torch.randn(4, 6, generator=generator)
    full = torch.full((4, 50), 0.7).scatter(-1, ids[:, :6], change)  # Δ = 0.7 on the whole tail
    exact = label_logprobs(logits + full, labels)
    torch.testing.assert_close(candidate_label_logprobs(base, tail, change, torch.full((4, 3), 0.7)), exact)
    # A tail shift that varies: many samples estimate the tail's share of the normaliser.
    varying = torch.randn(4, 50, generator=generator).scatter(-1, ids[:, :6], change)
    ids, base, tail = position_candidates(logits, labels, 6, tail_samples=20000, generator=torch.Generator().manual_seed(3))
    estimate = candidate_label_logprobs(base, tail, change, varying.gather(-1, ids[:, 6:]))
    torch.testing.assert_close(estimate, label_logprobs(logits + varying, labels), atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="tail_shift must be \\(N, S\\)"):
        candidate_label_logprobs(base, tail, change, torch.zeros(4, 0))


def test_position_candidates_put_the_label_first_and_account_for_all_probability():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 20, generator=generator)
    labels = logits.argmax(-1)  # the label is also the top token: it must not appear twice
    ids, base, tail = position_candidates(logits, labels, 5)
    assert torch.equal(ids[:, 0], labels)
    assert all(len(set(row.tolist())) == 5 for row in ids)
    torch.testing.assert_close(torch.cat([base, tail[:, None]], -1).logsumexp(-1), torch.zeros(6), atol=1e-5, rtol=0)
    top_other = logits.scatter(-1, labels[:, None], float("-inf")).topk(4, -1).indices
    assert torch.equal(ids[:, 1:].sort(-1).values, top_other.sort(-1).values)
    _, _, none_left = position_candidates(logits, labels, 20)
    assert torch.isneginf(none_left).all()
    with pytest.raises(ValueError, match="num_candidates must be in \\[1, 20\\].*got 21"):
        position_candidates(logits, labels, 21)


def test_adapter_output_rows_equal_the_gathered_update():
    torch.manual_seed(0)
    layer = PBLoRALinear(torch.nn.Linear(8, 40), r1=2, r2=3, num_objectives=2)
    torch.nn.init.normal_(layer.lora_B)
    x, preference = torch.randn(4, 8), torch.tensor([[0.2, 0.8], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    rows = torch.randint(0, 40, (4, 6))
    torch.testing.assert_close(layer.adapter_output_rows(x, preference, rows), layer.adapter_output(x, preference).gather(-1, rows))


@pytest.mark.parametrize("kind", ["pblora", "lora", "hidden"])
def test_candidate_shift_equals_the_reward_heads_change_at_those_tokens(make_model, kind):
    model = make_model(reward_head=kind)
    hidden = torch.randn(5, model.config.hidden_size)
    preference = torch.tensor([[0.3, 0.7]] * 5)
    lm_logits = model.backbone.get_output_embeddings()(hidden)
    full = model.reward_head(hidden, lm_logits, preference) - lm_logits  # (N, V)
    ids = torch.randint(0, model.config.vocab_size, (5, 9))
    torch.testing.assert_close(model.reward_head.candidate_shift(hidden, preference, ids), full.gather(-1, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("context_kind", ["prompt", "prompt-product"])
def test_candidate_shift_of_a_prompt_context_head(make_model, context_kind):
    model = make_model(reward_head="hidden", reward_context=context_kind)
    hidden, context = torch.randn(2, 5, model.config.hidden_size)
    preference = torch.tensor([[0.3, 0.7]] * 5)
    lm_logits = model.backbone.get_output_embeddings()(hidden)
    full = model.reward_head(hidden, lm_logits, preference, context) - lm_logits  # (N, V)
    ids = torch.randint(0, model.config.vocab_size, (5, 9))
    shift = model.reward_head.candidate_shift(hidden, preference, ids, context=context)
    torch.testing.assert_close(shift, full.gather(-1, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["pblora", "hidden"])
def test_candidate_shift_of_a_branch_state_adds_the_lm_heads_change(make_model, kind):
    model = make_model(reward_head=kind)
    base, branch = torch.randn(2, 5, model.config.hidden_size)  # the backbone's final state, a reward branch's own
    preference = torch.tensor([[0.8, 0.2]] * 5)
    lm_head = model.backbone.get_output_embeddings()
    full = model.reward_head(branch, lm_head(branch), preference) - lm_head(base)  # (N, V) z_RM(h') - z_LM(h)
    ids = torch.randint(0, model.config.vocab_size, (5, 7))
    shift = model.reward_head.candidate_shift(branch, preference, ids, base_hidden=base)
    torch.testing.assert_close(shift, full.gather(-1, ids), atol=1e-4, rtol=1e-4)


def test_full_rank_head_refuses_candidate_tokens(make_model):
    model = make_model(reward_head="full_rank")
    with pytest.raises(ValueError, match="full_rank"):
        model.reward_head.candidate_shift(torch.randn(2, model.config.hidden_size), torch.tensor([[1.0, 0.0]] * 2), torch.zeros(2, 3, dtype=torch.long))


def _prepared(backbone, tokenizer, small_data, tmp_path, candidate_tokens, tail_samples=0, **heads):
    model_settings = {"gate_size": 16, "gate_heads": 2, **heads}
    config = make_config(small_data, tmp_path, candidate_tokens=candidate_tokens, tail_samples=tail_samples, model=model_settings)
    model = fresh_model(backbone, tokenizer, config)
    from conftest import randomize_adapters

    randomize_adapters(model, scale=0.3)
    return config, model, prepare_data(config, model, progress=False)


@pytest.mark.parametrize(
    "heads",
    [
        {"reward_layers": 0},
        {"reward_layers": 1},
        {"reward_head": "hidden", "reward_context": "prompt"},
        {"reward_head": "hidden", "reward_context": "prompt-product"},
    ],
    ids=str,
)
def test_scores_on_the_whole_vocabulary_as_candidates_equal_the_exact_ones(backbone, tokenizer, small_data, tmp_path, heads):
    vocab = backbone.get_output_embeddings().out_features
    config, model, data = _prepared(backbone, tokenizer, small_data, tmp_path, vocab, **heads)
    for objective in config.objectives:
        batch = data.collate(data.train[objective], np.arange(5))
        assert batch.candidates is not None and batch.candidates.ids.shape[1] == vocab
        preference = torch.tensor([[0.6, 0.4]] * batch.input_ids.shape[0])
        sparse = score_pairs(model, batch, preference)
        exact = score_pairs(model, batch, preference, exact=True)
        torch.testing.assert_close(sparse.rewards, exact.rewards, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sparse.fused_logprobs, exact.fused_logprobs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sparse.gate, exact.gate)


def test_joined_batches_keep_candidates_aligned_with_their_tokens(backbone, tokenizer, small_data, tmp_path):
    config, model, data = _prepared(backbone, tokenizer, small_data, tmp_path, 6, tail_samples=4)
    batches = [data.collate(data.train[name], np.arange(3)) for name in config.objectives]
    loss, _ = training_loss(model, batches, torch.tensor([0.5, 0.5]), config)  # score_pairs checks the label column
    assert torch.isfinite(loss)
    broken = batches[1]
    broken.candidates.ids[0, 0] += 1
    with pytest.raises(ValueError, match="candidate tokens do not belong"):
        training_loss(model, batches, torch.tensor([0.5, 0.5]), config)


def test_candidate_cache_is_built_once_and_checks_its_inputs(backbone, tokenizer, small_data, tmp_path, monkeypatch):
    config, model, data = _prepared(backbone, tokenizer, small_data, tmp_path, 8)
    assert json.loads((data.candidates.directory / "candidates.json").read_text())["num_candidates"] == 8
    assert data.candidates.ids.shape[1] == 8 and data.candidates.num_candidates == 8
    from paretoalign import candidates as candidates_module

    monkeypatch.setattr(candidates_module, "position_candidates", lambda *a: (_ for _ in ()).throw(AssertionError("rebuilt")))
    again = prepare_data(config, model, progress=False)
    assert again.candidates.directory == data.candidates.directory
    lengths = np.diff(data.cache.offsets)
    with pytest.raises(ValueError, match=r"prompt_lengths\[0\] = 0"):
        build_candidate_cache(model.backbone.get_output_embeddings(), data.cache, np.zeros_like(lengths), 8)


def test_training_on_candidates_lowers_the_loss_and_validates_on_the_vocabulary(backbone, tokenizer, small_data, tmp_path):
    config = make_config(small_data, tmp_path, steps=20, checkpoint_every=20, eval_every=10, candidate_tokens=16, tail_samples=8)
    model = fresh_model(backbone, tokenizer, config)
    data = prepare_data(config, model, progress=False)
    fixed = [data.collate(data.train[name], np.arange(8)) for name in config.objectives]
    with torch.no_grad():
        before, _ = training_loss(model, fixed, torch.tensor([0.5, 0.5]), config)
    train(config, model, progress=False)
    with torch.no_grad():
        after, _ = training_loss(model, fixed, torch.tensor([0.5, 0.5]), config)
    assert after < before - 0.05
    log = [json.loads(line) for line in (Path(config.output_dir) / "training_log.jsonl").read_text().splitlines()]
    assert [r.get("val_readout") for r in log if "val_readout" in r] == ["candidates-16", "vocabulary"]
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    assert summary["val/helpfulness/accuracy@1,0"] == log[-1]["val/helpfulness/accuracy@1,0"]


def test_candidate_tokens_setting_is_validated(small_data, tmp_path):
    with pytest.raises(ValueError, match="candidate_tokens must be an integer >= 2.*got 1"):
        make_config(small_data, tmp_path, candidate_tokens=1)
    with pytest.raises(ValueError, match="tail_samples must be an integer >= 0.*got -1"):
        make_config(small_data, tmp_path, candidate_tokens=4, tail_samples=-1)
    with pytest.raises(ValueError, match="candidate_tokens needs .*reward_head='full_rank'"):
        make_config(small_data, tmp_path, candidate_tokens=4, model={"gate_size": 16, "gate_heads": 2, "reward_head": "full_rank"})
