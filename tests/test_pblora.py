"""PBLoRALinear against the formula, by hand and in matrix form; merge/unmerge; preference validation."""

import pytest
import torch
from torch import nn

from paretoalign.pblora import PBLoRAConfig, PBLoRALinear


def make_layer(r1=2, r2=3, k=2, in_features=5, out_features=4, seed=0, randomize=True):
    torch.manual_seed(seed)
    layer = PBLoRALinear(nn.Linear(in_features, out_features), r1=r1, r2=r2, num_objectives=k, lora_alpha=6.0)
    if randomize:
        with torch.no_grad():
            layer.lora_B.normal_()
            if r1:
                layer.lora_W1.normal_()
    return layer


def test_forward_matches_hand_computed_example():
    layer = PBLoRALinear(nn.Linear(2, 1), r1=1, r2=1, num_objectives=2, lora_alpha=2.0)  # s = 2 / 1
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.tensor([[1.0, 1.0]]))
        layer.base_layer.bias.zero_()
        layer.lora_A.copy_(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
        layer.lora_B.copy_(torch.tensor([[3.0, 4.0]]))
        layer.lora_W1.copy_(torch.tensor([[0.5]]))
        layer.lora_W2.weight.copy_(torch.tensor([[2.0], [-1.0]]).T)
    # A x = (3, 1); blockdiag(0.5, W2(w) = 2*0.25 - 1*0.75 = -0.25) -> (1.5, -0.25); B -> 3*1.5 + 4*(-0.25) = 3.5
    # s * 3.5 = 7, base = 1 + 1 = 2, total 9.
    out = layer(torch.tensor([[1.0, 1.0]]), torch.tensor([0.25, 0.75]))
    assert out.shape == (1, 1)
    assert out.item() == pytest.approx(9.0)


def test_forward_matches_matrix_formula_and_delta_weight():
    layer = make_layer()
    preference = torch.tensor([0.3, 0.7])
    x = torch.randn(2, 7, 5)
    w2 = (layer.lora_W2.weight @ preference).reshape(3, 3)
    delta = layer.scaling * layer.lora_B @ torch.block_diag(layer.lora_W1, w2) @ layer.lora_A
    expected = x @ (layer.base_layer.weight + delta).T + layer.base_layer.bias
    torch.testing.assert_close(layer(x, preference), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.get_delta_weight(preference), delta)
    assert layer.scaling == 6.0 / 3


def test_fresh_adapter_reproduces_base_exactly():
    layer = make_layer(randomize=False)
    x = torch.randn(3, 4, 5)
    assert torch.equal(layer(x, torch.tensor([0.5, 0.5])), layer.base_layer(x))


def test_rows_carry_their_own_preference():
    layer = make_layer()
    x = torch.randn(3, 6, 5)
    preferences = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    batched = layer(x, preferences)
    for row in range(3):
        torch.testing.assert_close(batched[row], layer(x[row : row + 1], preferences[row])[0])
    assert not torch.allclose(batched[0], layer(x[0:1], preferences[2])[0])


def test_r1_zero_is_allowed():
    layer = make_layer(r1=0)
    preference = torch.tensor([0.2, 0.8])
    x = torch.randn(2, 5)
    w2 = (layer.lora_W2.weight @ preference).reshape(3, 3)
    expected = layer.base_layer(x) + layer.scaling * x @ (layer.lora_B @ w2 @ layer.lora_A).T
    torch.testing.assert_close(layer(x, preference), expected)


def test_merge_matches_unmerged_and_unmerge_restores_exactly():
    layer = make_layer()
    preference = torch.tensor([0.6, 0.4])
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 5)
    unmerged_out = layer(x, preference)
    layer.merge(preference)
    assert layer.merged
    torch.testing.assert_close(layer(x, preference), unmerged_out, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="merged"):
        layer(x, torch.tensor([0.0, 1.0]))
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)
    torch.testing.assert_close(layer(x, preference), unmerged_out)


def test_base_is_frozen_and_adapters_train():
    layer = make_layer()
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_W1", "lora_W2.weight"}


@pytest.mark.parametrize(
    "preference, message",
    [
        ([0.5, 0.25, 0.25], "3 weights but there are 2"),
        ([-0.5, 1.5], "non-negative"),
        ([0.5, 0.6], "sum to 1"),
        ([float("nan"), 1.0], "finite"),
    ],
)
def test_bad_preferences_raise_naming_the_value(preference, message):
    layer = make_layer()
    with pytest.raises(ValueError, match=message) as error:
        layer(torch.randn(1, 5), torch.tensor(preference))
    assert str(preference[1]) in str(error.value)


def test_config_validation_names_the_value():
    with pytest.raises(ValueError, match="r2 must be .* got 0"):
        PBLoRAConfig(r1=1, r2=0)
    with pytest.raises(ValueError, match="r1 must be .* got -1"):
        PBLoRAConfig(r1=-1)
    with pytest.raises(ValueError, match="r2 must be .* got True"):  # a bool is an int to Python, not a rank
        PBLoRAConfig(r1=1, r2=True)
    with pytest.raises(ValueError, match="num_objectives must be .* got True"):
        PBLoRALinear(nn.Linear(2, 2), num_objectives=True)
    with pytest.raises(TypeError, match="nn.Linear"):
        PBLoRALinear(nn.Conv1d(2, 2, 1))
