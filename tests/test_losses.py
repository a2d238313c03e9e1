"""Every loss against numbers worked out by hand on tiny literal tensors."""

import math

import pytest
import torch

from paretoalign.losses import (
    arm_preference_loss,
    gate_entropy,
    gate_entropy_loss,
    gate_logit_penalty,
    label_logprobs,
    multi_objective_loss,
    next_token_targets,
    sample_preference,
)

LN2, LN3 = math.log(2.0), math.log(3.0)
# One sequence, vocabulary 3, four positions. Softmax of each row, by hand:
#   [0, 0, 0]     -> (1/3, 1/3, 1/3)
#   [ln2, 0, 0]   -> (2/4, 1/4, 1/4)
#   [ln3, 0, 0]   -> (3/5, 1/5, 1/5)
LOGITS = torch.tensor([[[0.0, 0.0, 0.0], [LN2, 0.0, 0.0], [LN3, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # (1, 4, 3)
INPUT_IDS = torch.tensor([[0, 1, 2, 0]])  # (1, 4)


def token_logprobs(logits, input_ids, response_mask):
    """The trainers' read-out of response tokens: the shift of ``next_token_targets``, then ``label_logprobs``."""
    labels, mask = next_token_targets(input_ids, response_mask)  # (B, T-1) each
    logprobs = label_logprobs(logits[:, :-1], labels)  # (B, T-1)
    return torch.where(mask, logprobs, torch.zeros_like(logprobs)), mask.to(logprobs.dtype)


def sequence_logprobs(logits, input_ids, response_mask):
    return token_logprobs(logits, input_ids, response_mask)[0].sum(-1)  # (B,)


def test_token_logprobs_pair_each_position_with_the_next_token():
    # position 0 predicts token 1 (p=1/3), position 1 token 2 (p=1/4), position 2 token 0 (p=3/5)
    logprobs, mask = token_logprobs(LOGITS, INPUT_IDS, torch.tensor([[0, 1, 1, 1]]))
    assert logprobs.shape == mask.shape == (1, 3)
    torch.testing.assert_close(logprobs, torch.tensor([[math.log(1 / 3), math.log(1 / 4), math.log(3 / 5)]]))
    torch.testing.assert_close(mask, torch.ones(1, 3))


def test_sequence_logprobs_sums_the_response_tokens():
    # log(1/3) + log(1/4) + log(3/5) = log(3/60) = -log 20
    total = sequence_logprobs(LOGITS, INPUT_IDS, torch.tensor([[0, 1, 1, 1]]))
    assert total.shape == (1,)
    torch.testing.assert_close(total, torch.tensor([-math.log(20.0)]))


def test_sequence_logprobs_shifts_the_mask_with_the_labels():
    # Only the last token (id 0) is the response. Right: logits at position 2 ([ln3, 0, 0]) give 3/5.
    # Mask left unshifted (mask[:, :-1]) gives 0; labels left unshifted (logits[3] for token 3) give 1/3.
    total = sequence_logprobs(LOGITS, INPUT_IDS, torch.tensor([[0, 0, 0, 1]]))
    torch.testing.assert_close(total, torch.tensor([math.log(3 / 5)]))
    # The first token is never predicted, so marking it changes nothing.
    first_only = sequence_logprobs(LOGITS, INPUT_IDS, torch.tensor([[1, 0, 0, 0]]))
    torch.testing.assert_close(first_only, torch.tensor([0.0]))


def test_sequence_logprobs_ignores_left_padding_and_matches_a_loop():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 5, generator=generator)  # (B, T, V)
    input_ids = torch.randint(0, 5, (2, 6), generator=generator)  # (B, T)
    response_mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1]])  # second row: one response token
    expected = torch.zeros(2)
    for row in range(2):
        for position in range(1, 6):
            if response_mask[row, position]:
                expected[row] += torch.log_softmax(logits[row, position - 1], -1)[input_ids[row, position]]
    torch.testing.assert_close(sequence_logprobs(logits, input_ids, response_mask), expected)


def test_next_token_targets_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(1, 3\)"):
        next_token_targets(INPUT_IDS, torch.ones(1, 3))


def test_arm_loss_at_zero_margin_is_log_two():
    loss, stats = arm_preference_loss(torch.tensor([-3.0, 1.5]), torch.tensor([-3.0, 1.5]), beta_r=2.0)
    torch.testing.assert_close(loss, torch.tensor(LN2))
    assert stats["rewards/accuracies"].item() == 0.0  # ties are not wins


def test_arm_loss_with_known_sigmoids_and_stats():
    # beta (R_c - R_r) = ln 3  ->  sigmoid = 3/4  ->  loss ln(4/3); the second pair: margin -ln 3 -> sigmoid 1/4 -> ln 4
    chosen = torch.tensor([LN3 / 2, 0.0])
    rejected = torch.tensor([0.0, LN3 / 2])
    loss, stats = arm_preference_loss(chosen, rejected, beta_r=2.0)
    torch.testing.assert_close(loss, torch.tensor((math.log(4 / 3) + math.log(4.0)) / 2))
    torch.testing.assert_close(stats["rewards/chosen"], torch.tensor(LN3 / 4))
    torch.testing.assert_close(stats["rewards/rejected"], torch.tensor(LN3 / 4))
    torch.testing.assert_close(stats["rewards/margins"], torch.tensor(0.0))
    torch.testing.assert_close(stats["rewards/accuracies"], torch.tensor(0.5))


def test_arm_loss_gradient_by_hand():
    # d/dR_c of -log sigmoid(beta m) = -beta (1 - sigmoid(beta m)); beta=1, m=ln 3: -(1 - 3/4) = -1/4
    chosen = torch.tensor([LN3], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    loss, stats = arm_preference_loss(chosen, rejected, beta_r=1.0)
    loss.backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.25]))
    torch.testing.assert_close(rejected.grad, torch.tensor([0.25]))
    assert not any(value.requires_grad for value in stats.values())


def test_arm_loss_validates_inputs():
    with pytest.raises(ValueError, match="beta_r must be > 0, got 0"):
        arm_preference_loss(torch.zeros(2), torch.zeros(2), beta_r=0)
    with pytest.raises(ValueError, match=r"chosen_rewards.*\(2,\).*\(3,\)"):
        arm_preference_loss(torch.zeros(2), torch.zeros(3), beta_r=1.0)


def test_gate_entropy_at_one_half_is_log_two():
    torch.testing.assert_close(gate_entropy(torch.full((2, 3), 0.5)), torch.tensor(LN2))


def test_gate_entropy_averages_only_masked_positions():
    # H(1/4) = 1/4 ln 4 + 3/4 ln(4/3); the masked-out 0.9 must not count
    alpha = torch.tensor([[0.5, 0.25, 0.9]])
    mask = torch.tensor([[1, 1, 0]])
    h_quarter = 0.25 * math.log(4.0) + 0.75 * math.log(4 / 3)
    torch.testing.assert_close(gate_entropy(alpha, mask), torch.tensor((LN2 + h_quarter) / 2))


def test_gate_entropy_is_finite_at_a_saturated_gate():
    alpha = torch.tensor([[0.0, 1.0]], requires_grad=True)
    entropy = gate_entropy(alpha)
    entropy.backward()
    assert 0.0 <= entropy.item() < 1e-4
    assert torch.isfinite(alpha.grad).all()


def test_gate_entropy_loss_is_minus_lambda_times_entropy():
    torch.testing.assert_close(gate_entropy_loss(torch.full((1, 4), 0.5), lambda_g=0.1), torch.tensor(-0.1 * LN2))
    with pytest.raises(ValueError, match="lambda_g must be >= 0, got -1"):
        gate_entropy_loss(torch.full((1, 4), 0.5), lambda_g=-1)
    with pytest.raises(ValueError, match="shapes must agree"):
        gate_entropy(torch.full((1, 4), 0.5), torch.ones(1, 3))


def test_multi_objective_loss_by_hand():
    # 2 + 0.5 * (0.25 * 1 + 0.75 * 3) - 0.1 = 2 + 1.25 - 0.1
    total = multi_objective_loss(
        torch.tensor(2.0), torch.tensor([1.0, 3.0]), torch.tensor([0.25, 0.75]), torch.tensor(-0.1), lambda_r=0.5
    )
    torch.testing.assert_close(total, torch.tensor(3.15))


def test_multi_objective_loss_validates_inputs():
    with pytest.raises(ValueError, match="lambda_r must be >= 0, got -0.5"):
        multi_objective_loss(torch.tensor(0.0), torch.ones(2), torch.ones(2) / 2, torch.tensor(0.0), lambda_r=-0.5)
    with pytest.raises(ValueError, match=r"pref_losses.*\(2,\).*weights.*\(3,\)"):
        multi_objective_loss(torch.tensor(0.0), torch.ones(2), torch.ones(3) / 3, torch.tensor(0.0))
    with pytest.raises(ValueError, match="gate_loss must be a scalar"):
        multi_objective_loss(torch.tensor(0.0), torch.ones(2), torch.ones(2) / 2, torch.zeros(2))


def test_sample_preference_lies_on_the_simplex_and_is_reproducible():
    samples = torch.stack([sample_preference(3, torch.Generator().manual_seed(seed)) for seed in range(50)])  # (50, 3)
    assert samples.shape == (50, 3)
    assert (samples >= 0).all()
    torch.testing.assert_close(samples.sum(-1), torch.ones(50))
    again = sample_preference(3, torch.Generator().manual_seed(7))
    torch.testing.assert_close(again, samples[7], rtol=0, atol=0)
    assert not torch.equal(samples[0], samples[1])


def test_sample_preference_follows_the_generator_and_leaves_the_global_rng_alone():
    first, second = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    draws_a = [sample_preference(2, first) for _ in range(3)]
    state = torch.get_rng_state()
    draws_b = [sample_preference(2, second) for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(draws_a, draws_b))
    assert not torch.equal(draws_a[0], draws_a[1])


def test_sample_preference_concentration():
    generator = torch.Generator().manual_seed(0)
    uniform = torch.stack([sample_preference(2, generator) for _ in range(400)])  # (400, 2)
    assert abs(uniform[:, 0].mean().item() - 0.5) < 0.06  # Dirichlet(1, 1): the first weight is uniform on [0, 1]
    peaked = sample_preference(2, generator, concentration=[1000.0, 3000.0])
    torch.testing.assert_close(peaked, torch.tensor([0.25, 0.75]), atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="concentration must be > 0"):
        sample_preference(2, generator, concentration=0.0)
    with pytest.raises(ValueError, match="num_objectives must be a positive int, got 0"):
        sample_preference(0, generator)


def _scored_rewards(model, tokenizer, texts, response_lengths, preference):
    """``score_pairs`` rewards of ``texts`` (left-padded), the last ``response_lengths[i]`` tokens of row i the response."""
    from paretoalign.objective import PairBatch, score_pairs

    tokenizer.padding_side = "left"
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    response_mask = torch.zeros_like(attention_mask)
    for row, length in enumerate(response_lengths):
        response_mask[row, -length:] = 1
    batch = PairBatch(model.backbone_hidden(input_ids, attention_mask), input_ids, attention_mask, response_mask)
    rewards = score_pairs(model, batch, torch.tensor([preference] * len(texts)), fused=False).rewards
    return rewards, input_ids, attention_mask, response_mask


def test_reward_baseline_measures_the_heads_change_to_the_lm(make_model, tokenizer):
    """'backbone' rewards are literal rewards minus the frozen LM's own log-likelihood of the response."""
    rewards = {}
    for baseline in ("none", "backbone"):
        model = make_model(reward_baseline=baseline)
        rewards[baseline], input_ids, attention_mask, response_mask = _scored_rewards(
            model, tokenizer, ["Hi there friend", "Hi you"], [2, 2], [0.2, 0.8]
        )
    preference = torch.tensor([[0.2, 0.8]] * 2)
    out = model(input_ids, attention_mask, preference)
    literal = sequence_logprobs(out.reward_logits, input_ids, response_mask)
    lm = sequence_logprobs(out.lm_logits, input_ids, response_mask)
    assert torch.allclose(rewards["none"], literal, atol=1e-4)
    assert torch.allclose(rewards["backbone"], literal - lm, atol=1e-4)
    assert not torch.allclose(rewards["backbone"], rewards["none"])
    assert rewards["backbone"].requires_grad  # the frozen LM's part is a constant; the head's part still trains


@pytest.mark.parametrize("through", [True, False])
def test_fusion_gradient_reaches_the_reward_head_only_when_asked(make_model, tokenizer, through):
    from paretoalign.objective import PairBatch, score_pairs

    model = make_model()
    encoded = tokenizer(["Hi there friend", "Hi you all"], return_tensors="pt", padding=True)
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    batch = PairBatch(model.backbone_hidden(input_ids, attention_mask), input_ids, attention_mask, attention_mask.clone())
    scores = score_pairs(model, batch, torch.tensor([[0.5, 0.5]] * 2), reward_grad_from_fusion=through)
    scores.fused_logprobs.sum().backward()
    reward_grad = model.reward_head.adapter.lora_B.grad
    assert (reward_grad is not None and reward_grad.abs().sum() > 0) == through
    assert model.context_gate.score.weight.grad.abs().sum() > 0  # the gate always learns from the LM loss


def test_mean_reward_reduction_divides_by_the_response_length(make_model, tokenizer):
    """'mean' rewards are the 'sum' rewards over the number of response tokens of each row (rows differ in length)."""
    rewards = {}
    for reduction in ("sum", "mean"):
        model = make_model(reward_reduction=reduction)  # adapters randomised: rewards are not all zero
        rewards[reduction] = _scored_rewards(model, tokenizer, ["Hi there friend, how are you", "Hi you"], [4, 2], [0.7, 0.3])[0]
    assert rewards["sum"].abs().min() > 1e-4
    assert torch.allclose(rewards["mean"], rewards["sum"] / torch.tensor([4.0, 2.0]), atol=1e-5)


def test_reward_reduction_is_validated():
    from paretoalign.model import DualHeadConfig

    with pytest.raises(ValueError, match="reward_reduction must be one of \\('sum', 'mean'\\), got 'max'"):
        DualHeadConfig(reward_reduction="max")


def test_gate_logit_penalty_is_lambda_times_mean_square_and_pulls_a_saturated_gate_back():
    logits = torch.tensor([[12.0, -4.0, 30.0]], requires_grad=True)  # the third position is masked out
    mask = torch.tensor([[1, 1, 0]])
    penalty = gate_logit_penalty(logits, mask, lambda_z=0.01)
    torch.testing.assert_close(penalty, torch.tensor(0.01 * (144.0 + 16.0) / 2))
    penalty.backward()
    # where the sigmoid's slope is ~0 (alpha = sigmoid(12) is 1 in float32) the penalty's gradient is largest
    torch.testing.assert_close(logits.grad, torch.tensor([[0.01 * 12.0, 0.01 * -4.0, 0.0]]))
    assert gate_logit_penalty(logits, mask, lambda_z=0.0).item() == 0.0
    with pytest.raises(ValueError, match="lambda_z must be >= 0, got -0.1"):
        gate_logit_penalty(logits, mask, lambda_z=-0.1)
    with pytest.raises(ValueError, match="shape"):
        gate_logit_penalty(logits, torch.ones(1, 2), lambda_z=0.01)
