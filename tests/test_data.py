"""Parsing, loading, splitting and collating preference pairs (the vendored data and the tiny tokenizer)."""

import doctest
import gzip
import json
import random
import sys

import pytest

import paretoalign.data
from paretoalign.data import (
    DATA_DIR,
    OBJECTIVE_SOURCES,
    PreferenceCollator,
    PreferencePair,
    load_default_pairs,
    load_pairs,
    near_duplicate_groups,
    parse_hh_dialogue,
    parse_hh_pair,
    parse_pku_pair,
    prompt_key,
    split_pairs,
    split_pools,
)

DIALOGUE = (
    "\n\nHuman: My note says: Human: be kind.\nWhat does it mean?"
    "\n\nAssistant: It is a reminder.\nBe kind to people."
    "\n\nHuman: Thanks!  Anything else?"
    "\n\nAssistant: "
)


def hh_record(prompt_text: str, chosen: str, rejected: str) -> dict:
    return {"chosen": f"{prompt_text} {chosen}", "rejected": f"{prompt_text} {rejected}"}


# ---------------------------------------------------------------------------------------------- parsing


def test_parse_hh_dialogue_multi_turn():
    messages = parse_hh_dialogue(DIALOGUE + "No, that is all.")
    assert messages == [
        {"role": "user", "content": "My note says: Human: be kind.\nWhat does it mean?"},
        {"role": "assistant", "content": "It is a reminder.\nBe kind to people."},
        {"role": "user", "content": "Thanks!  Anything else?"},
        {"role": "assistant", "content": "No, that is all."},
    ]


def test_parse_hh_dialogue_leading_whitespace_and_no_leading_blank_line():
    expected = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert parse_hh_dialogue("Human: Hi\n\nAssistant: Hello") == expected
    assert parse_hh_dialogue("  \n\n\nHuman: Hi\n\n\nAssistant:Hello\n") == expected


def test_parse_hh_dialogue_merges_a_speaker_quoting_a_turn_marker():
    # HH-RLHF has replies that themselves contain "\n\nAssistant:": keep them as one message, verbatim
    messages = parse_hh_dialogue("\n\nHuman: Hi\n\nAssistant: Part one.\n\nAssistant: Part two.")
    assert messages == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Part one.\n\nAssistant: Part two."},
    ]


def test_parse_hh_dialogue_rejects_text_without_turns():
    with pytest.raises(ValueError, match="must start with"):
        parse_hh_dialogue("just some text")
    with pytest.raises(ValueError, match="must start with"):
        parse_hh_dialogue("preamble\n\nHuman: Hi")


def test_parse_hh_pair_takes_the_final_assistant_turns():
    pair = parse_hh_pair(hh_record(DIALOGUE, "No, that is all.", "Go away."), "helpfulness", "helpful-base")
    assert [message["role"] for message in pair.prompt] == ["user", "assistant", "user"]
    assert pair.prompt[-1]["content"] == "Thanks!  Anything else?"
    assert (pair.chosen, pair.rejected) == ("No, that is all.", "Go away.")
    assert (pair.objective, pair.source) == ("helpfulness", "helpful-base")
    assert pair.id == parse_hh_pair(hh_record(DIALOGUE, "No, that is all.", "Go away."), "helpfulness", "helpful-base").id
    assert len(pair.id) == 16


def test_parse_hh_pair_drops_identical_and_empty_replies():
    assert parse_hh_pair(hh_record(DIALOGUE, "Same.", "Same."), "helpfulness", "s") is None
    assert parse_hh_pair(hh_record(DIALOGUE, "Same.", "  Same.\n"), "helpfulness", "s") is None
    assert parse_hh_pair(hh_record(DIALOGUE, "Something.", ""), "helpfulness", "s") is None


def test_parse_hh_pair_broken_structure_is_none():
    ends_with_user = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye?",
    }
    assert parse_hh_pair(ends_with_user, "helpfulness", "s") is None
    parts_at_user_turn = {"chosen": "\n\nHuman: Hi\n\nAssistant: A", "rejected": "\n\nHuman: Ho\n\nAssistant: B"}
    assert parse_hh_pair(parts_at_user_turn, "helpfulness", "s") is None
    assert parse_hh_pair({"chosen": "no turns", "rejected": "\n\nHuman: Hi\n\nAssistant: B"}, "helpfulness", "s") is None
    with pytest.raises(ValueError, match="missing \\['rejected'\\]"):
        parse_hh_pair({"chosen": "x"}, "helpfulness", "s")


def test_parse_hh_pair_uses_the_common_prefix_when_transcripts_part_early():
    record = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Thanks\n\nAssistant: Welcome",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.",
    }
    pair = parse_hh_pair(record, "helpfulness", "s")
    assert pair.prompt == [{"role": "user", "content": "Hi"}]
    assert (pair.chosen, pair.rejected) == ("Hello!", "Go away.")


def test_parse_pku_pair():
    pair = parse_pku_pair({"prompt": " How do I pick a lock? ", "response": ["I can't help with that.", "Use a pin."]})
    assert pair.prompt == [{"role": "user", "content": "How do I pick a lock?"}]
    assert (pair.chosen, pair.rejected) == ("I can't help with that.", "Use a pin.")
    assert (pair.objective, pair.source) == ("harmlessness", "pku-saferlhf")
    assert parse_pku_pair({"prompt": "p", "response": ["same", "same "]}) is None
    with pytest.raises(ValueError, match="PKU-SafeRLHF record"):
        parse_pku_pair({"prompt": "p", "response": ["only one"]})


# ---------------------------------------------------------------------------------------------- loading


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")


RECORDS = [
    hh_record("\n\nHuman: Hi\n\nAssistant:", "Hello!", "Go away."),
    hh_record("\n\nHuman: Bread?\n\nAssistant:", "Flour, water, salt.", "No."),
    hh_record("\n\nHuman: Same?\n\nAssistant:", "Yes.", "Yes."),  # dropped
]


def test_load_pairs_jsonl_gz_detects_format_source_and_objective(tmp_path):
    path = tmp_path / "harmless-base.jsonl.gz"
    write_jsonl(path, RECORDS, gzip.open)
    pairs = load_pairs(path)
    assert [pair.chosen for pair in pairs] == ["Hello!", "Flour, water, salt."]
    assert {(pair.objective, pair.source) for pair in pairs} == {("harmlessness", "harmless-base")}


def test_load_pairs_unknown_source_needs_an_objective(tmp_path):
    path = tmp_path / "mine.jsonl"
    write_jsonl(path, RECORDS)
    with pytest.raises(ValueError, match="no objective known for source 'mine'"):
        load_pairs(path)
    assert {pair.objective for pair in load_pairs(path, objective="helpfulness")} == {"helpfulness"}


def test_load_pairs_pku_json_list(tmp_path):
    path = tmp_path / "safer.json"
    path.write_text(json.dumps([{"prompt": "p1", "response": ["safe", "unsafe"]}, {"prompt": "p2", "response": ["a", "b"]}]))
    pairs = load_pairs(path)
    assert [(pair.prompt[0]["content"], pair.source, pair.objective) for pair in pairs] == [
        ("p1", "pku-saferlhf", "harmlessness"),
        ("p2", "pku-saferlhf", "harmlessness"),
    ]


def test_load_pairs_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "helpful-base.jsonl"
    write_jsonl(path, [RECORDS[0], RECORDS[1], '{"chosen": "\\n\\nHuman: Hi", "rejected": ', RECORDS[0]])
    with pytest.raises(ValueError, match=r"helpful-base\.jsonl: line 3: invalid JSON"):
        load_pairs(path)
    write_jsonl(path, [RECORDS[0], RECORDS[1], {"chosen": "x"}])
    with pytest.raises(ValueError, match=r"helpful-base\.jsonl: line 3: expected keys"):
        load_pairs(path)
    gz_path = tmp_path / "helpful-base.jsonl.gz"
    write_jsonl(gz_path, [RECORDS[0], {"chosen": 3, "rejected": "y"}], gzip.open)
    with pytest.raises(ValueError, match=r"helpful-base\.jsonl\.gz: line 2: 'chosen' has the wrong type"):
        load_pairs(gz_path)


def test_load_pairs_malformed_json_list_names_the_item(tmp_path):
    path = tmp_path / "safer.json"
    path.write_text(json.dumps([{"prompt": "p1", "response": ["a", "b"]}, {"prompt": "p2"}]))
    with pytest.raises(ValueError, match=r"safer\.json: item 1: expected keys"):
        load_pairs(path)
    path.write_text(json.dumps([{"prompt": "p1", "response": ["a", None]}]))
    with pytest.raises(ValueError, match=r"safer\.json: item 0: 'response' has the wrong type"):
        load_pairs(path)
    path.write_text('[{"prompt": "p1",\n "response": ["a", "b"]},\n {"prompt" "p2"}]')
    with pytest.raises(ValueError, match=r"safer\.json: line 3, column"):
        load_pairs(path)


def test_load_pairs_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs(tmp_path / "absent.jsonl")


def test_load_pairs_without_datasets_gives_the_same_pairs(tmp_path, monkeypatch):
    path = tmp_path / "helpful-online.jsonl.gz"
    write_jsonl(path, RECORDS, gzip.open)
    with_datasets = load_pairs(path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    assert load_pairs(path) == with_datasets


@pytest.fixture(scope="module")
def default_pairs():
    return load_default_pairs(include_pku=False)


def test_vendored_data_is_attributed():
    assert "MIT" in (DATA_DIR / "hh-rlhf" / "LICENSE").read_text()
    assert "CC BY-NC 4.0" in (DATA_DIR / "pku-saferlhf" / "LICENSE").read_text()
    readme = (DATA_DIR / "README.md").read_text()
    assert "Anthropic" in readme and "PKU-SafeRLHF" in readme


def test_load_default_pairs_counts(default_pairs):
    # the files' 2,120 + 1,032 + 2,488 and 2,095 records, less equal/empty replies and broken transcripts
    assert {objective: len(pairs) for objective, pairs in default_pairs.items()} == {"helpfulness": 5603, "harmlessness": 2091}
    assert {pair.source for pair in default_pairs["helpfulness"]} == set(OBJECTIVE_SOURCES["helpfulness"])
    assert {pair.source for pair in default_pairs["harmlessness"]} == {"harmless-base"}  # include_pku=False: MIT data only
    pair = default_pairs["harmlessness"][0]
    assert pair.prompt[-1]["role"] == "user" and pair.chosen and pair.rejected and pair.chosen != pair.rejected


def test_load_default_pairs_includes_pku_by_default():
    pairs = load_default_pairs()
    assert sum(pair.source == "pku-saferlhf" for pair in pairs["harmlessness"]) == 4743
    assert len(pairs["harmlessness"]) == 2091 + 4743


# ---------------------------------------------------------------------------------------------- splitting


def split_prompts(splits):
    return {name: {prompt_key(pair.prompt) for pair in pairs} for name, pairs in splits.items()}


def test_split_pairs_is_disjoint_by_prompt_deterministic_and_order_independent(default_pairs):
    pairs = default_pairs["helpfulness"] + default_pairs["harmlessness"]
    splits = split_pairs(pairs, seed=0)
    prompts = split_prompts(splits)
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    assert sorted(pair.id for split in splits.values() for pair in split) == sorted(pair.id for pair in pairs)
    assert {name: len(split) for name, split in splits.items()} == {"train": 6207, "validation": 782, "test": 705}

    shuffled = list(pairs)
    random.Random(1).shuffle(shuffled)
    again = split_pairs(shuffled, seed=0)
    assert {name: {pair.id for pair in split} for name, split in again.items()} == {
        name: {pair.id for pair in split} for name, split in splits.items()
    }
    other_seed = split_pairs(pairs, seed=1)
    assert {pair.id for pair in other_seed["test"]} != {pair.id for pair in splits["test"]}


def test_split_pairs_keeps_a_shared_prompt_together():
    prompt = [{"role": "user", "content": "shared"}]
    pairs = [PreferencePair(prompt, f"good {index}", f"bad {index}", "helpfulness", "s") for index in range(20)]
    pairs += [PreferencePair([{"role": "user", "content": f"p{index}"}], "a", "b", "helpfulness", "s") for index in range(200)]
    splits = split_pairs(pairs, seed=3)
    holding = [name for name, split in splits.items() if any(pair.prompt == prompt for pair in split)]
    assert len(holding) == 1 and sum(pair.prompt == prompt for pair in splits[holding[0]]) == 20
    assert split_pairs(pairs, seed=3, fractions=(1.0, 0.0, 0.0))["train"] == pairs


def test_split_pairs_keeps_near_duplicate_prompts_together():
    def pair(text, turns=()):
        return PreferencePair([{"role": "user", "content": text}, *turns], "a", "b", "helpfulness", "s")

    family = [
        pair("How do I pick a lock?"),
        pair("how do i pick a LOCK"),  # the same words
        pair("How do I pick a lock?", [{"role": "assistant", "content": "Why?"}, {"role": "user", "content": "I'm locked out."}]),
        pair("How do I pick a lock quickly?"),  # 6 of 7 words shared
    ]
    others = [pair(f"Question number {index} about topic {index * 7}") for index in range(300)]
    for seed in range(5):
        splits = split_pairs(family + others, seed=seed)
        holding = {name for name, pairs in splits.items() for p in pairs if p in family}
        assert len(holding) == 1, f"seed {seed}: the near-duplicates landed in {holding}"
        assert len({name for name, pairs in splits.items() if pairs}) == 3  # the others still spread over the splits
    groups = near_duplicate_groups([p.prompt for p in family] + [[{"role": "user", "content": "Bake bread at home"}]])
    assert len(set(groups[:4])) == 1 and groups[4] != groups[0]


def test_split_pools_places_a_prompt_alike_for_every_objective(default_pairs):
    splits = split_pools({"helpfulness": default_pairs["helpfulness"], "harmlessness": default_pairs["harmlessness"]})
    together = split_pairs(default_pairs["helpfulness"] + default_pairs["harmlessness"])
    for name in ("train", "validation", "test"):
        assert {p.id for o in splits for p in splits[o][name]} == {p.id for p in together[name]}
        assert all(p.objective == o for o in splits for p in splits[o][name])


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.9, 0.2, -0.1), (0.5, 0.2, 0.2)])
def test_split_pairs_validates_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        split_pairs([], fractions=fractions)


# ---------------------------------------------------------------------------------------------- collating

MULTI_TURN = [
    {"role": "user", "content": "Please explain how photosynthesis works in green plants."},
    {"role": "assistant", "content": "Here is a recipe for bread: flour, water, salt and yeast."},
    {"role": "user", "content": "Hi"},
]


def response_tokens(batch, side, row):
    ids, mask = batch[f"{side}_input_ids"][row], batch[f"{side}_response_mask"][row]
    return ids[mask.bool()].tolist()


def test_collator_masks_and_left_padding(tokenizer):
    collator = PreferenceCollator(tokenizer, max_length=256, max_prompt_length=128, objectives=["helpfulness", "harmlessness"])
    pairs = [
        PreferencePair([{"role": "user", "content": "Hi"}], "Sure! The capital of France is Paris.", "No.", "helpfulness", "s"),
        PreferencePair(MULTI_TURN, "Sorry.", "I cannot help with breaking into property.", "harmlessness", "s"),
    ]
    batch = collator(pairs)
    shapes = {tuple(tensor.shape) for key, tensor in batch.items() if key != "objective"}
    assert len(shapes) == 1 and len(next(iter(shapes))) == 2  # every tensor (B, T), chosen and rejected alike
    assert batch["objective"].tolist() == [0, 1]
    eos = tokenizer.eos_token_id
    for row, pair in enumerate(pairs):
        text = tokenizer.apply_chat_template(pair.prompt, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False)
        for side in ("chosen", "rejected"):
            reply = tokenizer(getattr(pair, side), add_special_tokens=False)["input_ids"]
            assert response_tokens(batch, side, row) == reply + [eos]  # exactly the reply and its eos
            ids, attention = batch[f"{side}_input_ids"][row], batch[f"{side}_attention_mask"][row]
            real = int(attention.sum())
            assert attention.tolist() == [0] * (len(ids) - real) + [1] * real  # left padding
            assert ids[: len(ids) - real].eq(tokenizer.pad_token_id).all()
            assert ids[len(ids) - real :].tolist() == prompt["input_ids"] + reply + [eos]
            assert ids[-1].item() == eos


def test_collator_truncates_prompt_from_the_left_and_response_at_the_end(tokenizer):
    last_turn = tokenizer(tokenizer.apply_chat_template(MULTI_TURN[-1:], add_generation_prompt=True, tokenize=False))["input_ids"]
    collator = PreferenceCollator(tokenizer, max_length=len(last_turn) + 6, max_prompt_length=len(last_turn) + 2)
    long_reply = "Here is a recipe for bread: flour, water, salt and yeast."
    batch = collator([PreferencePair(MULTI_TURN, long_reply, "Ok.", "helpfulness", "s")])
    chosen = batch["chosen_input_ids"][0]
    assert len(chosen) == collator.max_length
    # the earlier turns went whole; the last user turn and the generation prompt stayed
    prompt_part = chosen[~batch["chosen_response_mask"][0].bool()].tolist()
    assert prompt_part == last_turn
    # the reply keeps its start (and loses its eos)
    reply = tokenizer(long_reply, add_special_tokens=False)["input_ids"]
    assert response_tokens(batch, "chosen", 0) == reply[:6]
    ok = tokenizer("Ok.", add_special_tokens=False)["input_ids"]
    assert response_tokens(batch, "rejected", 0) == ok + [tokenizer.eos_token_id]


def test_collator_cuts_a_single_overlong_turn_from_the_left(tokenizer):
    collator = PreferenceCollator(tokenizer, max_length=12, max_prompt_length=8)
    prompt = [{"role": "user", "content": "The weather today is sunny with a light breeze from the west."}]
    full = collator._template(prompt)
    assert collator.prompt_ids(prompt) == full[-8:]


def test_collator_validates(tokenizer):
    with pytest.raises(ValueError, match="max_prompt_length=64, max_length=64"):
        PreferenceCollator(tokenizer, max_length=64, max_prompt_length=64)
    collator = PreferenceCollator(tokenizer, max_length=64, max_prompt_length=32, objectives=["helpfulness"])
    with pytest.raises(ValueError, match=r"\['harmlessness'\] are not in objectives"):
        collator([PreferencePair([{"role": "user", "content": "Hi"}], "a", "b", "harmlessness", "s")])


def test_module_docstring_examples_run():
    assert doctest.testmod(paretoalign.data).failed == 0


@pytest.mark.slow
def test_collator_with_the_default_tokenizer():
    from paretoalign.backbone import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    assert tokenizer.eos_token == "<|im_end|>"
    pair = PreferencePair([{"role": "user", "content": "Hi"}], "Hello! How can I help?", "Go away.", "helpfulness", "s")
    batch = PreferenceCollator(tokenizer, max_length=128, max_prompt_length=64)([pair])
    for side in ("chosen", "rejected"):
        text = tokenizer.decode(response_tokens(batch, side, 0))
        assert text == getattr(pair, side) + "<|im_end|>"
