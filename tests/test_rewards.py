"""Reward scorers: the shipped offline MiniLM scorer, HF sequence classifiers (a tiny local GPT-2), specs and training pieces."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from paretoalign.scorers.rewards import (
    DEFAULT_SCORER_DIR,
    HH_TEMPLATE,
    EmbeddingRewardHead,
    HFObjectiveModel,
    HFRewardScorer,
    MiniLMRewardScorer,
    MiniLMScorerConfig,
    RewardScorer,
    as_conversation,
    format_for_reward_model,
    length_features,
    load_scorer,
    parse_hf_spec,
    reward_features,
)
from paretoalign.scorers.training import (
    EmbeddingCache,
    EncodedPairs,
    ScorerTrainConfig,
    embed_texts,
    fit_head,
    hh_splits,
    pairwise_accuracy,
)
from paretoalign.testing import tiny_tokenizer

OBJECTIVES = ("helpfulness", "harmlessness")
CONVERSATION = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "How do I pick a lock?"},
]
# The first held-out TEST pairs of each objective. The shipped scorer ranks 0.72 (helpfulness) and 0.68
# (harmlessness) of them right (0.58 and 0.68 on the whole split); the other objective's column gets 0.38,
# a random head about 0.5 +- 0.065.
HELD_OUT_PAIRS = 60


@pytest.fixture(scope="module")
def default_scorer():
    torch.set_num_threads(1)
    return load_scorer()


@pytest.fixture(scope="module")
def tiny_classifier():
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=16,
        n_layer=1,
        n_head=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2ForSequenceClassification(config).eval(), tokenizer


# --- formatting ------------------------------------------------------------------------------------------------


def test_format_single_turn_string_prompt():
    assert format_for_reward_model("How are you?", "Fine.") == "\n\nHuman: How are you?\n\nAssistant: Fine."


def test_format_renders_a_conversation_turn_by_turn():
    text = format_for_reward_model(CONVERSATION, "I can't help with that.")
    assert text == (
        "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that."
    )


def test_format_system_message_braces_and_custom_template():
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say {x}"}]
    assert (
        format_for_reward_model(conversation, "{x}", template="<u>{prompt}</u><a>{response}</a>")
        == "<u>Be brief.\n\nSay {x}</u><a>{x}</a>"
    )


def test_format_rejects_bad_template_and_prompt():
    with pytest.raises(ValueError, match="template must contain"):
        format_for_reward_model("Hi", "Hello", template="{prompt} only")
    with pytest.raises(ValueError, match="must end with a user turn"):
        format_for_reward_model(CONVERSATION[:2], "Hello")
    with pytest.raises(ValueError, match="'robot'"):
        as_conversation([{"role": "robot", "content": "beep"}])
    with pytest.raises(TypeError, match="a prompt must be"):
        as_conversation(42)


def test_length_features_of_empty_and_long_replies():
    features = length_features(["", "   ", "one two\nthree"])
    assert features.shape == (3, 3)
    np.testing.assert_allclose(features[0], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(features[1], [math.log1p(3), 0.0, 0.0])
    np.testing.assert_allclose(features[2], [math.log1p(13), math.log1p(3), math.log1p(1)], rtol=1e-6)


# --- specs -------------------------------------------------------------------------------------------------------


def test_parse_hf_spec_with_a_cost_model():
    spec = "hf:helpfulness=Ray2333/gpt2-large-helpful-reward_model, harmlessness=cost:PKU-Alignment/beaver-7b-v1.0-cost"
    assert parse_hf_spec(spec) == {
        "helpfulness": HFObjectiveModel("Ray2333/gpt2-large-helpful-reward_model", 1),
        "harmlessness": HFObjectiveModel("PKU-Alignment/beaver-7b-v1.0-cost", -1),
    }


@pytest.mark.parametrize(
    "spec, message",
    [
        ("hf:helpfulness", "must be 'objective=model_id'"),
        ("hf:helpfulness=a,helpfulness=b", "given twice"),
        ("hf:harmlessness=cost:", "has no model id"),
    ],
)
def test_parse_hf_spec_errors_name_the_spec(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_hf_spec(spec)
    assert repr(spec) in str(error.value)


def test_load_scorer_rejects_an_unknown_spec(tmp_path):
    with pytest.raises(ValueError, match="'no-such-scorer' is not 'default'"):
        load_scorer("no-such-scorer")
    with pytest.raises(ValueError, match="without scorer_config.json"):
        load_scorer(str(tmp_path))


# --- HF scorers on a tiny local GPT-2 ---------------------------------------------------------------------------


def test_hf_scorer_formats_signs_and_orders_columns(tiny_classifier):
    model, tokenizer = tiny_classifier
    scorer = HFRewardScorer(
        {"helpfulness": model, "harmlessness": model},
        {"helpfulness": tokenizer, "harmlessness": tokenizer},
        signs={"harmlessness": -1},
    )
    assert isinstance(scorer, RewardScorer)
    prompts, responses = ["Hi", CONVERSATION, "Why?"], ["Hello there.", "No.", "Because the sky is blue."]
    rewards = scorer.score(prompts, responses, batch_size=2)
    assert rewards.shape == (3, 2) and rewards.dtype == np.float64
    np.testing.assert_array_equal(rewards[:, 1], -rewards[:, 0])  # a cost model negates
    with torch.no_grad():  # the model reads the HH transcript, one at a time (no padding)
        expected = [
            model(**tokenizer(format_for_reward_model(p, r), return_tensors="pt")).logits[0, 0].item()
            for p, r in zip(prompts, responses)
        ]
    np.testing.assert_allclose(rewards[:, 0], expected, rtol=1e-5, atol=1e-5)
    described = scorer.describe()
    assert described["signs"] == {"helpfulness": 1, "harmlessness": -1} and described["template"] == HH_TEMPLATE
    json.dumps(described)


def test_hf_scorer_truncates_the_start_and_keeps_the_reply(tiny_classifier):
    model, tokenizer = tiny_classifier
    scorer = HFRewardScorer({"helpfulness": model}, {"helpfulness": tokenizer}, max_length=12)
    long_prompt = "Please explain how photosynthesis works in green plants. " * 10
    (reward,) = scorer.score([long_prompt], ["Sure!"])[:, 0]
    ids = tokenizer(format_for_reward_model(long_prompt, "Sure!"))["input_ids"][-12:]  # the last 12 tokens
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert reward == pytest.approx(expected, abs=1e-5)


def test_hf_scorer_empty_responses_and_bad_input(tiny_classifier):
    model, tokenizer = tiny_classifier
    scorer = HFRewardScorer({"helpfulness": model}, {"helpfulness": tokenizer})
    rewards = scorer.score(["Hi", "Hi"], ["", "  \n "])
    assert rewards.shape == (2, 1) and np.all(np.isfinite(rewards))
    assert scorer.score([], []).shape == (0, 1)
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        scorer.score(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="signs must map"):
        HFRewardScorer({"helpfulness": model}, {"helpfulness": tokenizer}, signs={"helpfulness": 2})


# --- the shipped MiniLM scorer -----------------------------------------------------------------------------------


def test_default_scorer_loads_offline_and_describes_itself(default_scorer):
    assert isinstance(default_scorer, MiniLMRewardScorer) and isinstance(default_scorer, RewardScorer)
    assert default_scorer.objectives == OBJECTIVES
    described = default_scorer.describe()
    assert described["higher_is_better"] and described["signs"] == {"helpfulness": 1, "harmlessness": 1}
    assert described["source"] == str(DEFAULT_SCORER_DIR)
    json.dumps(described)
    claimed = json.loads((DEFAULT_SCORER_DIR / "test_accuracy.json").read_text())["results"]
    splits = hh_splits(seed=0)
    for objective in OBJECTIVES:  # the card's numbers are over the whole held-out test split
        assert claimed[objective]["test"]["n"] == len(splits[objective]["test"])
        assert claimed[objective]["test"]["accuracy"] > 0.55


def test_default_scorer_shape_and_empty_responses(default_scorer):
    rewards = default_scorer.score(
        ["Hi", CONVERSATION, "Tell me a joke.", "Tell me a joke."], ["", "   ", "\n", "Why did the chicken cross the road?"]
    )
    assert rewards.shape == (4, 2) and rewards.dtype == np.float64
    assert np.all(np.isfinite(rewards))
    assert default_scorer.score([], []).shape == (0, 2)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        default_scorer.score(["Hi"], ["Hello"], batch_size=0)


def test_default_scorer_ranks_held_out_pairs(default_scorer):
    splits = hh_splits(seed=0)
    for column, objective in enumerate(OBJECTIVES):
        pairs = splits[objective]["test"][:HELD_OUT_PAIRS]
        prompts = [pair.prompt for pair in pairs]
        rewards = default_scorer.score(prompts + prompts, [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs])
        chosen, rejected = rewards[: len(pairs), column], rewards[len(pairs) :, column]
        accuracy = pairwise_accuracy(chosen, rejected)
        assert accuracy >= 0.58, f"{objective}: accuracy {accuracy:.3f} on {HELD_OUT_PAIRS} held-out test pairs"


def test_checkpoint_round_trip(default_scorer, tmp_path):
    default_scorer.save(tmp_path)
    reloaded = load_scorer(str(tmp_path))
    reloaded._encoder = default_scorer.encoder  # share the loaded encoder; only the heads are on disk
    prompts, responses = ["How do I bake bread?", CONVERSATION], ["Mix flour, water, salt and yeast.", "I won't help with that."]
    np.testing.assert_array_equal(reloaded.score(prompts, responses), default_scorer.score(prompts, responses))
    assert reloaded.config.to_dict() == default_scorer.config.to_dict()


def test_scorer_config_validates_and_round_trips(tmp_path):
    with pytest.raises(ValueError, match="hidden_sizes must have one entry per objective"):
        MiniLMScorerConfig(objectives=["helpfulness"], hidden_sizes={})
    with pytest.raises(ValueError, match="'colour'"):
        MiniLMScorerConfig(objectives=["helpfulness"], hidden_sizes={"helpfulness": 0}, features=["colour"])
    config = MiniLMScorerConfig(objectives=["helpfulness"], hidden_sizes={"helpfulness": 8}, embedding_size=4)
    config.save(tmp_path)
    assert MiniLMScorerConfig.load(tmp_path) == config
    assert config.feature_size == 2 * 4 + 3  # response, product, length


# --- training pieces ---------------------------------------------------------------------------------------------


def test_pairwise_accuracy_counts_ties_as_half():
    assert pairwise_accuracy([2.0, 1.0, 0.0, 3.0], [1.0, 1.0, 1.0, 0.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert math.isnan(pairwise_accuracy([], []))


def test_reward_features_blocks():
    prompt, response, lengths = torch.ones(2, 4), torch.full((2, 4), 2.0), torch.zeros(2, 3)
    features = reward_features(prompt, response, lengths, ["response", "product", "length"])
    assert features.shape == (2, 4 + 4 + 3)
    assert torch.equal(features[:, 4:8], torch.full((2, 4), 2.0))


class CountingEncoder:
    """Stands in for the sentence encoder: a text's embedding is its length, and calls are counted."""

    def __init__(self):
        self.encoded = 0

    def encode(self, texts, **kwargs):
        self.encoded += len(texts)
        return np.array([[len(text), 1.0] for text in texts], dtype=np.float32)


def test_embedding_cache_encodes_each_text_once_and_persists(tmp_path):
    encoder = CountingEncoder()
    texts = ["a", "bb", "a", "ccc"]
    first = embed_texts(encoder, texts, EmbeddingCache(tmp_path), progress=False)
    assert encoder.encoded == 3 and first.shape == (4, 2)
    np.testing.assert_array_equal(first[:, 0], [1, 2, 1, 3])
    again = embed_texts(encoder, texts + ["dddd"], EmbeddingCache(tmp_path), progress=False)  # a new process: read from disk
    assert encoder.encoded == 4
    np.testing.assert_array_equal(again[:4], first)


def test_fit_head_learns_a_separable_preference():
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(8, generator=generator)

    def pairs(n):
        a, b = torch.randn(n, 8, generator=generator), torch.randn(n, 8, generator=generator)
        better = (a @ direction > b @ direction)[:, None]
        return EncodedPairs(torch.where(better, a, b), torch.where(better, b, a))

    config = ScorerTrainConfig(hidden_sizes=[0], weight_decays=[0.0], epochs=20, batch_pairs=64, learning_rate=1e-2)
    head, record = fit_head(pairs(400), pairs(100), hidden_size=0, weight_decay=0.0, config=config)
    assert isinstance(head, EmbeddingRewardHead)
    assert record["validation_accuracy"] > 0.9 and 1 <= record["best_epoch"] <= 20


def test_train_config_names_the_bad_value():
    with pytest.raises(ValueError, match="epochs must be a positive int, got 0"):
        ScorerTrainConfig(epochs=0)
    with pytest.raises(ValueError, match="'colour'"):
        ScorerTrainConfig(features=["colour"])


def test_train_scorer_command_rejects_bad_arguments(capsys, tmp_path):
    from paretoalign.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train-scorer", "--out", str(tmp_path / "scorer"), "--epochs", "0"])
    assert exit_info.value.code == 2
    assert "epochs must be a positive int, got 0" in capsys.readouterr().err
    assert not (tmp_path / "scorer").exists()
