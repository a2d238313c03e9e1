"""DualHeadModel: fusion, the context gate's causality and cache, one backbone pass, save/load."""

import json

import pytest
import torch
from safetensors.torch import load_file

from paretoalign.model import CONFIG_NAME, WEIGHTS_NAME, DualHeadConfig, DualHeadModel, fuse_logits
from paretoalign.testing import tiny_backbone


def encode(tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    return batch["input_ids"], batch["attention_mask"]


def test_fuse_logits_by_hand():
    lm = torch.tensor([1.0, 2.0, 3.0])
    reward = torch.tensor([3.0, 2.0, 1.0])
    alpha = torch.tensor(0.25)
    # (1 - 0.25) * lm + 0.25 * reward
    assert fuse_logits(lm, reward, alpha, "gate", 1.0).tolist() == pytest.approx([1.5, 2.0, 2.5])
    # strength 2 doubles alpha: 0.5 * lm + 0.5 * reward
    assert fuse_logits(lm, reward, alpha, "gate", 2.0).tolist() == pytest.approx([2.0, 2.0, 2.0])
    log_z = torch.log(torch.exp(lm).sum())  # both heads share the normaliser: permutations of each other
    expected = (lm - log_z) + 0.5 * (reward - log_z)
    torch.testing.assert_close(fuse_logits(lm, reward, alpha, "genarm", 0.5), expected)
    with pytest.raises(ValueError, match="'sum'"):
        fuse_logits(lm, reward, alpha, "sum")


def test_untrained_heads_reproduce_the_backbone(make_model, tokenizer, backbone):
    model = make_model(randomize=False)
    input_ids, mask = encode(tokenizer, ["How do I pick a lock?", "Hello"])
    out = model(input_ids, mask, preference=torch.tensor([0.2, 0.8]))
    reference = backbone(input_ids=input_ids, attention_mask=mask).logits
    assert torch.equal(out.reward_logits, out.lm_logits)
    assert torch.equal(out.logits, out.lm_logits)
    real = mask.bool()
    torch.testing.assert_close(out.lm_logits[real], reference[real], rtol=1e-4, atol=1e-4)


def test_forward_shapes_and_one_backbone_pass(make_model, tokenizer, backbone):
    model = make_model()
    calls = []
    handle = backbone.base_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        input_ids, mask = encode(tokenizer, ["a b c", "How do I pick a lock?"])
        out = model(input_ids, mask, preference=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    finally:
        handle.remove()
    batch, length = input_ids.shape
    vocab = len(tokenizer)
    assert len(calls) == 1
    assert out.lm_logits.shape == out.reward_logits.shape == out.logits.shape == (batch, length, vocab)
    assert out.gate.shape == (batch, length)
    assert ((out.gate > 0) & (out.gate < 1)).all()
    assert not torch.allclose(out.reward_logits, out.lm_logits)


def test_preference_changes_reward_logits(make_model, tokenizer):
    model = make_model()
    input_ids, mask = encode(tokenizer, ["Tell me about bread"])
    helpful = model(input_ids, mask, preference=torch.tensor([1.0, 0.0]))
    harmless = model(input_ids, mask, preference=torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(helpful.lm_logits, harmless.lm_logits)
    assert not torch.allclose(helpful.reward_logits, harmless.reward_logits)
    assert not torch.allclose(helpful.gate, harmless.gate)


def test_gate_is_causal(make_model, tokenizer):
    model = make_model()
    input_ids, mask = encode(tokenizer, ["How do I pick a lock? I need to know."])
    changed = input_ids.clone()
    changed[0, -3:] = torch.tensor([5, 6, 7])
    preference = torch.tensor([0.4, 0.6])
    before = model(input_ids, mask, preference).gate
    after = model(changed, mask, preference).gate
    torch.testing.assert_close(before[:, :-3], after[:, :-3], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, -3:], after[:, -3:])


def test_incremental_gate_equals_full_recomputation(make_model, tokenizer):
    model = make_model()
    input_ids, mask = encode(tokenizer, ["short", "How do I pick a lock? Please tell me."])
    preference = model.preference_batch(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), 2)
    hidden = model.backbone_hidden(input_ids, mask)
    full, _ = model.context_gate(hidden, mask, preference)
    split = 5
    first, cache = model.context_gate(hidden[:, :split], mask[:, :split], preference)
    pieces = [first]
    for t in range(split, input_ids.shape[1]):
        alpha, cache = model.context_gate(hidden[:, t : t + 1], mask[:, : t + 1], preference, cache)
        pieces.append(alpha)
    incremental = torch.cat(pieces, dim=1)
    real = mask.bool()
    torch.testing.assert_close(incremental[real], full[real], rtol=1e-5, atol=1e-6)
    last, _ = model.context_gate(hidden, mask, preference, last_only=True)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_left_padding_does_not_change_a_row(make_model, tokenizer):
    model = make_model()
    preference = torch.tensor([0.5, 0.5])
    alone_ids, alone_mask = encode(tokenizer, ["Hello"])
    batch_ids, batch_mask = encode(tokenizer, ["Hello", "How do I pick a lock? Please tell me."])
    alone = model(alone_ids, alone_mask, preference)
    batched = model(batch_ids, batch_mask, preference)
    length = alone_ids.shape[1]
    torch.testing.assert_close(batched.gate[0, -length:], alone.gate[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched.logits[0, -length:], alone.logits[0], rtol=1e-4, atol=1e-4)


def test_gate_logits_are_alphas_pre_sigmoid_values(make_model, tokenizer):
    input_ids, mask = encode(tokenizer, ["Hello there", "Hi"])
    model = make_model()
    hidden = model.backbone_hidden(input_ids, mask)
    preference = model.preference_batch([0.3, 0.7], 2)
    alpha, _ = model.gate(hidden, mask, preference)
    logits, _ = model.gate(hidden, mask, preference, logits=True)
    torch.testing.assert_close(torch.sigmoid(logits), alpha)
    fixed = make_model(fixed_gate=0.25)
    fixed_logits, _ = fixed.gate(hidden, mask, preference, logits=True)
    torch.testing.assert_close(torch.sigmoid(fixed_logits), torch.full_like(fixed_logits, 0.25))


def test_fixed_gate_and_single_head_ablations(make_model, tokenizer):
    input_ids, mask = encode(tokenizer, ["Hello there"])
    fixed = make_model(fixed_gate=0.5)(input_ids, mask, torch.tensor([0.5, 0.5]))
    assert torch.equal(fixed.gate, torch.full_like(fixed.gate, 0.5))
    single = make_model(gate_heads=1)
    assert single.context_gate.num_heads == 1
    assert single(input_ids, mask, torch.tensor([0.5, 0.5])).gate.shape == input_ids.shape


@pytest.mark.parametrize("kind", ["hidden", "full_rank", "lora"])
def test_reward_head_kinds(make_model, tokenizer, kind):
    model = make_model(reward_head=kind)
    input_ids, mask = encode(tokenizer, ["Hello there"])
    first = model(input_ids, mask, torch.tensor([1.0, 0.0])).reward_logits
    second = model(input_ids, mask, torch.tensor([0.0, 1.0])).reward_logits
    assert torch.allclose(first, second) == (kind == "lora")
    lm_head = model.backbone.get_output_embeddings().weight
    trainable = model.trainable_state_dict()
    if kind == "full_rank":
        assert trainable["reward_head.adapter.base_layer.weight"].shape == lm_head.shape
    else:
        assert all(t.shape != lm_head.shape for t in trainable.values())


def test_hidden_reward_head_is_the_lm_head_over_a_shifted_hidden_state(make_model, tokenizer):
    model = make_model(reward_head="hidden")
    input_ids, mask = encode(tokenizer, ["Hello there"])
    preference = torch.tensor([0.3, 0.7])
    out = model(input_ids, mask, preference)
    hidden = model.backbone_hidden(input_ids, mask).float()  # (1, T, d)
    adapter = model.reward_head.adapter
    shift = hidden @ adapter.get_delta_weight(preference).T  # (1, T, d)
    expected = model.backbone.get_output_embeddings()(hidden + shift)  # (1, T, V)
    assert torch.allclose(out.reward_logits, expected, atol=1e-4)
    assert "reward_head.adapter.base_layer.weight" not in model.trainable_state_dict()
    assert model.trainable_state_dict()["reward_head.adapter.lora_B"].shape[0] == hidden.shape[-1]


def test_save_load_round_trip(make_model, tokenizer, backbone, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert set(saved) == set(model.trainable_state_dict())
    assert not any(name.startswith("backbone.") for name in saved)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["backbone"] == backbone.name_or_path
    assert config["vocab_size"] == len(tokenizer) and config["hidden_size"] == 32
    assert config["tokenizer_fingerprint"] and config["weights_fingerprint"]
    loaded = DualHeadModel.from_pretrained(tmp_path, backbone=backbone, tokenizer=tokenizer)
    input_ids, mask = encode(tokenizer, ["How do I pick a lock?"])
    preference = torch.tensor([0.3, 0.7])
    torch.testing.assert_close(loaded(input_ids, mask, preference).logits, model(input_ids, mask, preference).logits)


def test_checkpoint_for_another_backbone_is_refused(make_model, tokenizer, tmp_path):
    make_model().save_pretrained(tmp_path)
    other, _ = tiny_backbone(tokenizer, seed=7)
    with pytest.raises(ValueError, match="tiny-llama-2x32-seed0.*tiny-llama-2x32-seed7"):
        DualHeadModel.from_pretrained(tmp_path, backbone=other, tokenizer=tokenizer)
    wider, _ = tiny_backbone(tokenizer, seed=0, hidden_size=64)
    with pytest.raises(ValueError, match="hidden_size 32 != 64"):
        DualHeadModel.from_pretrained(tmp_path, backbone=wider, tokenizer=tokenizer)


def test_bad_inputs_raise_clear_errors(make_model, tokenizer, tmp_path):
    model = make_model()
    input_ids, mask = encode(tokenizer, ["Hello"])
    with pytest.raises(ValueError, match="preference is required"):
        model(input_ids, mask)
    with pytest.raises(ValueError, match=r"\[0.7, 0.7\] must sum to 1"):
        model(input_ids, mask, torch.tensor([0.7, 0.7]))
    with pytest.raises(ValueError, match="3 rows but the batch has 1"):
        model(input_ids, mask, torch.tensor([[1.0, 0.0]] * 3))
    with pytest.raises(ValueError, match="fusion must be one of .* got 'mix'"):
        DualHeadConfig(fusion="mix")
    with pytest.raises(ValueError, match="gate_size \\(10\\) must be a positive multiple of gate_heads \\(4\\)"):
        DualHeadConfig(gate_size=10, gate_heads=4)
    with pytest.raises(FileNotFoundError, match="dualhead_config.json"):
        DualHeadModel.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown DualHeadConfig fields \\['colour'\\]"):
        DualHeadConfig.from_dict({"colour": "red"})


# ---------------------------------------------------------------------------------------------- reward branch (reward_layers)


def test_untrained_reward_branch_reproduces_the_backbone(make_model, tokenizer):
    model = make_model(randomize=False, reward_layers=1)
    input_ids, mask = encode(tokenizer, ["How do I pick a lock?", "Hello"])
    out = model(input_ids, mask, preference=torch.tensor([0.2, 0.8]))
    real = mask.bool()
    torch.testing.assert_close(out.reward_logits[real], out.lm_logits[real], rtol=1e-5, atol=1e-5)


def test_reward_branch_steers_by_preference_and_saves_adapters_only(make_model, tokenizer, backbone, tmp_path):
    model = make_model(reward_layers=2)
    input_ids, mask = encode(tokenizer, ["How do I pick a lock?", "Hello"])
    a = model(input_ids, mask, preference=torch.tensor([1.0, 0.0]))
    b = model(input_ids, mask, preference=torch.tensor([0.0, 1.0]))
    real = mask.bool()
    assert not torch.allclose(a.reward_logits[real], b.reward_logits[real])
    torch.testing.assert_close(a.lm_logits, b.lm_logits)  # the LM branch keeps the frozen blocks
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    branch = {name for name in saved if name.startswith("reward_branch.")}
    assert branch and all(".lora_" in name for name in branch)  # the copied blocks are the backbone's: never saved
    loaded = DualHeadModel.from_pretrained(tmp_path, backbone=backbone, tokenizer=tokenizer)
    torch.testing.assert_close(loaded(input_ids, mask, preference=torch.tensor([1.0, 0.0])).reward_logits, a.reward_logits)


def test_reward_branch_from_a_lower_block_equals_the_branch_from_its_own(make_model, tokenizer):
    from paretoalign.features import block_input

    model = make_model(reward_layers=1)
    input_ids, mask = encode(tokenizer, ["How do I pick a lock?", "Hello there, friend"])
    preference = torch.tensor([[0.3, 0.7], [0.9, 0.1]])
    hidden, own = model.backbone_states(input_ids, mask)
    torch.testing.assert_close(own, block_input(model.backbone, input_ids, mask, 1))
    lower = block_input(model.backbone, input_ids, mask, 0)
    real = mask.bool()
    expected = model.reward_hidden(hidden, own, mask, preference)
    torch.testing.assert_close(model.reward_hidden(hidden, lower, mask, preference, from_layer=0)[real], expected[real], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="from_layer"):
        model.reward_hidden(hidden, lower, mask, preference, from_layer=2)


def test_reward_layers_is_validated(make_model):
    with pytest.raises(ValueError, match="reward_layers"):
        DualHeadConfig(reward_layers=-1)
    with pytest.raises(ValueError, match=r"reward_layers must be an integer in \[1, 2\].*got 3"):
        make_model(reward_layers=3)


@pytest.mark.parametrize("context_kind", ["prompt", "prompt-product"])
def test_prompt_context_head_reads_the_prompts_mean_state(make_model, tokenizer, context_kind):
    model = make_model(reward_head="hidden", reward_context=context_kind)
    prompt_ids, prompt_mask = encode(tokenizer, ["How do I pick a lock?"])
    reply_ids, _ = encode(tokenizer, [" You need a tension wrench"])
    input_ids = torch.cat([prompt_ids, reply_ids], dim=1)
    mask = torch.ones_like(input_ids)
    prompt_only = torch.cat([prompt_mask, torch.zeros_like(reply_ids)], dim=1)
    preference = torch.tensor([0.3, 0.7])
    out = model(input_ids, mask, preference, prompt_mask=prompt_only)
    hidden = model.backbone_hidden(input_ids, mask).float()  # (1, T, d)
    context = hidden[:, : prompt_ids.shape[1]].mean(dim=1, keepdim=True).expand_as(hidden)  # the prompt's mean state
    read = [hidden, context]
    if context_kind == "prompt-product":  # h ⊙ c, rescaled to h's root-mean-square at each position
        product = hidden * context
        read.append(product * hidden.norm(dim=-1, keepdim=True) / product.norm(dim=-1, keepdim=True))
    shift = torch.cat(read, dim=-1) @ model.reward_head.adapter.get_delta_weight(preference).T  # (1, T, d)
    expected = model.backbone.get_output_embeddings()(hidden + shift)
    torch.testing.assert_close(out.reward_logits, expected, atol=1e-4, rtol=1e-4)
    # The reply's tokens are not the prompt: reading them into the context changes the head.
    assert not torch.allclose(model(input_ids, mask, preference).reward_logits, out.reward_logits, atol=1e-3)


@pytest.mark.parametrize("context_kind", ["prompt", "prompt-product"])
def test_prompt_context_head_decodes_what_it_scores(make_model, tokenizer, context_kind):
    from paretoalign.generation import DualHeadDecoder

    model = make_model(reward_head="hidden", reward_context=context_kind)
    prompt_ids, prompt_mask = encode(tokenizer, ["Hi", "How do I pick a lock? Please tell me."])  # left-padded
    reply = torch.tensor([[5, 9, 11], [7, 3, 2]])
    preference = model.preference_batch(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), 2)
    input_ids = torch.cat([prompt_ids, reply], dim=1)
    mask = torch.cat([prompt_mask, torch.ones_like(reply)], dim=1)
    prompt_only = torch.cat([prompt_mask, torch.zeros_like(reply)], dim=1)
    full = model(input_ids, mask, preference, prompt_mask=prompt_only).logits  # (B, T, V)
    for top_k in (0, 6):  # the whole vocabulary, and the candidate read-out at the base model's top-k
        decoder = DualHeadDecoder(model, guidance_top_k=top_k)
        steps = [decoder.start(prompt_ids, prompt_mask, preference)]
        for t in range(reply.shape[1]):
            steps.append(decoder.step(reply[:, t : t + 1], mask[:, : prompt_ids.shape[1] + t + 1]))
        for t, step in enumerate(steps):
            expected = full[:, prompt_ids.shape[1] - 1 + t]  # (B, V)
            if top_k:
                keep = step.logits.isfinite()
                assert keep.sum(dim=-1).tolist() == [top_k, top_k]
                torch.testing.assert_close(step.logits[keep], expected[keep], atol=1e-4, rtol=1e-4)
            else:
                torch.testing.assert_close(step.logits, expected, atol=1e-4, rtol=1e-4)


def test_prompt_context_needs_a_hidden_head_and_a_context(make_model, tokenizer):
    with pytest.raises(ValueError, match="reward_context 'prompt' needs reward_head 'hidden', got 'pblora'"):
        DualHeadConfig(reward_head="pblora", reward_context="prompt")
    with pytest.raises(ValueError, match="reward_context must be one of .*got 'reply'"):
        DualHeadConfig(reward_head="hidden", reward_context="reply")
    model = make_model(reward_head="hidden", reward_context="prompt")
    hidden = torch.randn(3, model.config.hidden_size)
    with pytest.raises(ValueError, match="pass context"):
        model.reward_head.candidate_shift(hidden, torch.tensor([[0.5, 0.5]] * 3), torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt_mask is empty"):
        model.prompt_context(hidden[None], torch.zeros(1, 3))
