"""Generation: batching with left padding, the gate cache during decoding, streaming, stopping, sampling."""

import pytest
import torch

from paretoalign.generation import StepOutput, generate, stream_generate

PROMPTS = ["How do I pick a lock?", "Hi", "Tell me about bread and the weather today, please."]


def test_greedy_row_is_identical_alone_and_in_a_batch(make_model):
    model = make_model()
    preferences = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    batched = generate(model, PROMPTS, preferences, max_new_tokens=12, temperature=0)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, prompt, preferences[row], max_new_tokens=12, temperature=0)[0]
        assert alone.token_ids == batched[row].token_ids
        assert alone.text == batched[row].text
        torch.testing.assert_close(torch.tensor(alone.gate), torch.tensor(batched[row].gate), rtol=1e-5, atol=1e-6)


def test_sampled_row_is_identical_alone_and_in_a_batch(make_model):
    model = make_model()
    batched = generate(model, PROMPTS, [0.5, 0.5], max_new_tokens=10, temperature=1.0, top_p=0.95, seed=3)
    alone = generate(model, PROMPTS[1], [0.5, 0.5], max_new_tokens=10, temperature=1.0, top_p=0.95, seed=3)[0]
    assert alone.token_ids == batched[1].token_ids
    again = generate(model, PROMPTS[1], [0.5, 0.5], max_new_tokens=10, temperature=1.0, top_p=0.95, seed=3)[0]
    assert again.token_ids == alone.token_ids


def test_generation_gate_equals_a_full_forward_over_the_answer(make_model, tokenizer):
    model = make_model()
    preference = torch.tensor([0.3, 0.7])
    result = generate(model, PROMPTS[0], preference, max_new_tokens=8, temperature=0)[0]
    prompt_ids = tokenizer(result.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    full_ids = torch.cat([prompt_ids, torch.tensor([result.token_ids])], dim=1)
    out = model(full_ids, preference=preference)
    # alpha behind token i sits at the position that predicted it.
    start = prompt_ids.shape[1] - 1
    expected = out.gate[0, start : start + len(result.token_ids)]
    torch.testing.assert_close(torch.tensor(result.gate), expected, rtol=1e-5, atol=1e-6)
    assert out.logits[0, start : start + len(result.token_ids)].argmax(-1).tolist() == result.token_ids


def test_untrained_heads_decode_like_the_base_model(make_model):
    model = make_model(randomize=False)
    fused = generate(model, PROMPTS, [0.0, 1.0], max_new_tokens=10, temperature=0)
    base = generate(model, PROMPTS, [0.0, 1.0], method="base", max_new_tokens=10, temperature=0)
    assert [g.token_ids for g in fused] == [g.token_ids for g in base]
    hf = model.backbone.generate(
        **model.tokenizer(fused[0].prompt, return_tensors="pt", add_special_tokens=False), max_new_tokens=10, do_sample=False
    )
    assert hf[0, -10:].tolist()[: len(base[0].token_ids)] == base[0].token_ids


def test_one_prompt_sweeps_many_preferences(make_model):
    model = make_model()
    grid = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    results = generate(model, PROMPTS[0], grid, max_new_tokens=6, temperature=0)
    assert [r.preference for r in results] == grid
    assert len({tuple(r.gate) for r in results}) == 3


def test_tokens_concatenate_to_text_and_align_with_gate(make_model):
    model = make_model()
    result = generate(model, PROMPTS[2], [0.5, 0.5], max_new_tokens=15, temperature=1.0, seed=1)[0]
    assert "".join(result.tokens) == result.text
    assert len(result.tokens) == len(result.token_ids) == len(result.gate)
    assert result.finish_reason in ("eos", "length")


def test_stream_grows_to_the_generated_answer(make_model):
    model = make_model()
    snapshots = [s[0].text for s in stream_generate(model, PROMPTS[0], [0.5, 0.5], max_new_tokens=8, temperature=0)]
    final = generate(model, PROMPTS[0], [0.5, 0.5], max_new_tokens=8, temperature=0)[0]
    assert len(snapshots) >= 2
    assert snapshots[-1] == final.text


class ScriptedDecoder:
    """Emits a fixed token sequence per row (then EOS), to test stopping without a trained model."""

    def __init__(self, scripts, vocab_size, eos):
        self.scripts, self.vocab_size, self.eos, self.step_index = scripts, vocab_size, eos, 0

    def _out(self):
        logits = torch.full((len(self.scripts), self.vocab_size), -1e9)
        for row, script in enumerate(self.scripts):
            token = script[self.step_index] if self.step_index < len(script) else self.eos
            logits[row, token] = 0.0
        self.step_index += 1
        return StepOutput(logits, torch.full((len(self.scripts),), 0.25))

    def start(self, input_ids, attention_mask, preference, prompts=None):
        self.prompt_length = attention_mask.shape[1]
        return self._out()

    def step(self, tokens, attention_mask):
        assert tokens.shape == (len(self.scripts), 1)
        assert attention_mask.shape[1] == self.prompt_length + self.step_index  # the mask grows one column a step
        return self._out()


def test_stops_at_eos_per_row(make_model, tokenizer):
    model = make_model()
    eos = tokenizer.eos_token_id
    decoder = ScriptedDecoder([[40, 41], [42, 43, 44, 45]], len(tokenizer), eos)
    results = generate(model, PROMPTS[:2], [0.5, 0.5], decoder=decoder, max_new_tokens=20, temperature=0)
    assert [r.token_ids for r in results] == [[40, 41], [42, 43, 44, 45]]
    assert [r.finish_reason for r in results] == ["eos", "eos"]
    assert decoder.step_index == 5  # stopped as soon as every row had finished
    assert results[0].gate == [0.25, 0.25]


def test_chat_messages_are_accepted(make_model):
    model = make_model()
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bread?"}]
    result = generate(model, chat, [0.5, 0.5], max_new_tokens=4, temperature=0)[0]
    assert result.prompt.endswith("<|im_start|>assistant\n")
    assert "Hello!" in result.prompt


def _ngrams(ids: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


@pytest.mark.parametrize("method", ["dualhead", "base"])
def test_the_loop_guard_stops_repeats_and_changes_nothing_before_one(make_model, method):
    model = make_model()
    plain = generate(model, PROMPTS, [0.5, 0.5], method=method, max_new_tokens=40, temperature=0)
    guarded = generate(model, PROMPTS, [0.5, 0.5], method=method, max_new_tokens=40, temperature=0, no_repeat_ngram_size=3)
    looped = 0
    for free, kept in zip(plain, guarded):
        grams = _ngrams(kept.token_ids, 3)
        assert len(grams) == len(set(grams)), kept.token_ids  # no 3-gram of the answer twice
        # identical up to the step where the free answer first completes a 3-gram it already wrote
        first = next((t for t in range(3, len(free.token_ids) + 1) if tuple(free.token_ids[t - 3 : t]) in _ngrams(free.token_ids[: t - 1], 3)), None)
        if first is None:
            assert kept.token_ids == free.token_ids
        else:
            looped += 1
            assert kept.token_ids[: first - 1] == free.token_ids[: first - 1]
            assert kept.token_ids[first - 1] != free.token_ids[first - 1]
    assert looped  # the random test model loops, so the guard was exercised


def test_the_loop_guard_keeps_a_row_whose_every_candidate_repeats(make_model):
    # With guidance restricted to the base model's top-1 token, a banned token is the only candidate: it stays.
    model = make_model()
    plain = generate(model, PROMPTS, [0.5, 0.5], guidance_top_k=1, max_new_tokens=30, temperature=0)
    guarded = generate(model, PROMPTS, [0.5, 0.5], guidance_top_k=1, max_new_tokens=30, temperature=0, no_repeat_ngram_size=2)
    assert [g.token_ids for g in guarded] == [g.token_ids for g in plain]
    assert any(len(set(_ngrams(g.token_ids, 2))) < len(_ngrams(g.token_ids, 2)) for g in plain)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),
        ({"max_new_tokens": True}, "max_new_tokens must be a positive integer, got True"),
        ({"top_k": False}, "top_k must be an integer >= 0 .* got False"),
        ({"temperature": -1.0}, "temperature must be >= 0 .* got -1.0"),
        ({"top_p": 1.5}, "top_p must be in \\(0, 1\\], got 1.5"),
        ({"no_repeat_ngram_size": 1}, "no_repeat_ngram_size must be 0 \\(off\\) or an integer >= 2, got 1"),
        ({"method": "beam"}, "unknown method 'beam'; registered methods are"),
    ],
)
def test_bad_generation_arguments(make_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(make_model(), "Hi", [0.5, 0.5], **kwargs)


def test_bad_prompts_and_preferences(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="prompts must not be empty"):
        generate(model, [], [0.5, 0.5])
    with pytest.raises(ValueError, match="a prompt must be a string or a list of"):
        generate(model, [123], [0.5, 0.5])
    with pytest.raises(ValueError, match="prompt 2: the prompt is empty"):
        generate(model, ["Hi", " \n"], [0.5, 0.5])
    with pytest.raises(ValueError, match="every message of the prompt is empty"):
        generate(model, [[{"role": "user", "content": ""}]], [0.5, 0.5])
    with pytest.raises(ValueError, match="2 rows but the batch has 3"):
        generate(model, PROMPTS, [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="must be non-negative"):
        generate(model, "Hi", [1.5, -0.5])


def test_reward_branch_decodes_with_its_cache_like_a_full_forward(make_model, tokenizer):
    model = make_model(reward_layers=2, strength=3.0)
    preference = torch.tensor([0.8, 0.2])
    results = generate(model, PROMPTS[:2], preference, max_new_tokens=8, temperature=0)
    assert results[0].token_ids != generate(make_model(randomize=False), PROMPTS[0], preference, max_new_tokens=8, temperature=0)[0].token_ids
    for result in results:
        prompt_ids = tokenizer(result.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        full_ids = torch.cat([prompt_ids, torch.tensor([result.token_ids])], dim=1)
        out = model(full_ids, preference=preference)
        start = prompt_ids.shape[1] - 1
        assert out.logits[0, start : start + len(result.token_ids)].argmax(-1).tolist() == result.token_ids


@pytest.mark.parametrize("method", ["dualhead", "base"])
def test_decoding_warns_nothing_on_todays_transformers(make_model, method):
    """Our calls use the cache argument transformers supports now: no FutureWarning or DeprecationWarning."""
    import warnings

    model = make_model(reward_layers=1) if method == "dualhead" else make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        answers = generate(model, ["Hi", "How do I bake bread?"], [0.5, 0.5], method=method, max_new_tokens=4, temperature=0)
    assert len(answers) == 2


def test_a_bf16_backbone_decodes_with_fp32_heads_and_follows_the_fp32_answers(backbone, tokenizer, make_model, tmp_path):
    import copy

    from paretoalign.backbone import parse_dtype
    from paretoalign.evaluation.sweep import SweepConfig
    from paretoalign.model import DualHeadModel

    exact = make_model()
    exact.save_pretrained(tmp_path / "heads")
    half_backbone = copy.deepcopy(backbone).to(torch.bfloat16)
    half = DualHeadModel.from_pretrained(tmp_path / "heads", backbone=half_backbone, tokenizer=tokenizer)
    assert {p.dtype for p in half.parameters() if p.requires_grad} == {torch.float32}  # only the frozen backbone is 16-bit
    prompts, grid = ["How do I pick a lock?", "Tell me about bread."], [[1.0, 0.0], [0.0, 1.0]]
    answers = {name: generate(m, prompts * 2, grid * 2, max_new_tokens=8, temperature=0) for name, m in (("fp32", exact), ("bf16", half))}
    assert all(a.text and len(a.token_ids) == 8 or a.finish_reason == "eos" for a in answers["bf16"])
    # a tiny random model has near-ties, so only the first tokens are asked to agree
    assert sum(a.token_ids[:2] == b.token_ids[:2] for a, b in zip(answers["fp32"], answers["bf16"])) >= 3
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype("auto") is None
    with pytest.raises(ValueError, match="dtype must be one of .*got 'bf16'"):
        SweepConfig(prompts="p.jsonl", out=str(tmp_path / "s"), dtype="bf16")


def test_static_cache_states_equal_the_dynamic_cache_ones(make_model, tokenizer):
    from paretoalign.static_step import StaticBackbone

    model = make_model()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    static = StaticBackbone(model.backbone, 4, compile=False)
    torch.testing.assert_close(static.start(ids, mask), model.backbone_hidden(ids, mask), atol=1e-5, rtol=1e-5)
    tokens = torch.tensor([[5], [7], [9]])
    for _ in range(4):
        ids, mask = torch.cat([ids, tokens], dim=1), torch.cat([mask, torch.ones_like(tokens)], dim=1)
        full = model.backbone_hidden(ids, mask)[:, -1:]  # (B, 1, d): the whole sequence again, no cache
        torch.testing.assert_close(static.step(tokens, mask), full, atol=1e-5, rtol=1e-5)
        tokens = tokens + 1
    assert static.mask.shape[1] % 128 == 0  # cache lengths come in buckets, so similar prompts share a compile


@pytest.mark.parametrize("method", ["dualhead", "base"])
def test_compiled_decoding_writes_the_same_answers(make_model, method):
    model = make_model(reward_head="hidden", guidance_top_k=5)
    preferences = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    eager = generate(model, PROMPTS, preferences, method=method, max_new_tokens=10, temperature=0)
    compiled = generate(model, PROMPTS, preferences, method=method, max_new_tokens=10, temperature=0, compile=True)
    assert [g.token_ids for g in compiled] == [g.token_ids for g in eager]
    if method == "dualhead":
        torch.testing.assert_close(torch.tensor(compiled[1].gate), torch.tensor(eager[1].gate), rtol=1e-4, atol=1e-5)


def test_compile_settings_are_checked(make_model):
    from paretoalign.generation import BaseDecoder, make_decoder
    from paretoalign.static_step import StaticBackbone

    model = make_model()
    with pytest.raises(ValueError, match="compile covers the 'dualhead' and 'base' methods, got method 'args'"):
        make_decoder(model, "args", compile=True, max_new_tokens=4)
    with pytest.raises(ValueError, match="needs max_new_tokens .* got None"):
        BaseDecoder(model.backbone, compile=True)
    with pytest.raises(ValueError, match="reward branch"):
        make_decoder(make_model(reward_layers=1), "dualhead", compile=True, max_new_tokens=4)
    static = StaticBackbone(model.backbone, 1, compile=False)
    ids = torch.ones(1, 127, dtype=torch.long)
    static.start(ids, torch.ones_like(ids))  # 128 slots: the prompt and one new token
    static.step(torch.ones(1, 1, dtype=torch.long), torch.ones(1, 128, dtype=torch.long))
    with pytest.raises(ValueError, match="static cache holds 128 tokens"):
        static.step(torch.ones(1, 1, dtype=torch.long), torch.ones(1, 129, dtype=torch.long))


def test_the_checkpoints_loop_guard_is_the_default_and_a_call_overrides_it(make_model, backbone, tokenizer, tmp_path):
    from paretoalign.model import DualHeadConfig, DualHeadModel

    plain = make_model()
    guarded = make_model(no_repeat_ngram_size=3)
    expected = [g.token_ids for g in generate(plain, PROMPTS, [0.5, 0.5], max_new_tokens=30, temperature=0, no_repeat_ngram_size=3)]
    assert [g.token_ids for g in generate(guarded, PROMPTS, [0.5, 0.5], max_new_tokens=30, temperature=0)] == expected
    free = [g.token_ids for g in generate(plain, PROMPTS, [0.5, 0.5], max_new_tokens=30, temperature=0)]
    assert [g.token_ids for g in generate(guarded, PROMPTS, [0.5, 0.5], max_new_tokens=30, temperature=0, no_repeat_ngram_size=0)] == free
    assert free != expected
    guarded.save_pretrained(tmp_path / "ckpt")  # the guard travels with the checkpoint
    loaded = DualHeadModel.from_pretrained(tmp_path / "ckpt", backbone=backbone, tokenizer=tokenizer)
    assert loaded.config.no_repeat_ngram_size == 3
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be 0 \\(off\\) or an integer >= 2, got -2"):
        DualHeadConfig(no_repeat_ngram_size=-2)
