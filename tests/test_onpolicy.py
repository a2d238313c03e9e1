"""On-policy replies: sampling resumes and refuses other settings, teachers label pairs of a prompt's replies, the
feature cache reuses every sequence it already holds."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from paretoalign import features as features_module
from paretoalign import onpolicy as onpolicy_module
from paretoalign.features import FeatureCache, build_feature_cache
from paretoalign.onpolicy import SampleConfig, read_replies, sample_replies
from paretoalign.teachers import OnPolicyGroup, Teacher, label_onpolicy


def write_prompts(path: Path, count: int) -> Path:
    lines = [{"prompt": [{"role": "user", "content": f"Question {i}: how do I bake bread?"}], "source": "harmless-base" if i % 2 else "helpful-base"} for i in range(count)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_sampling_writes_k_replies_per_prompt_and_resumes(make_model, tmp_path, monkeypatch):
    model = make_model(randomize=False)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 5)
    config = SampleConfig(prompts=str(prompts), out=str(tmp_path / "replies"), k=3, max_new_tokens=6, batch_size=6)  # 2 prompts a batch
    real_append, calls = onpolicy_module.append_rows, []

    def interrupted(path, rows):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_append(path, rows)

    monkeypatch.setattr(onpolicy_module, "append_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sample_replies(config, model, progress=False)
    monkeypatch.setattr(onpolicy_module, "append_rows", real_append)
    assert len(read_replies(config.out)) == 2
    result = sample_replies(config, model, progress=False)
    assert (result["written"], result["skipped"], result["total"]) == (3, 2, 5)
    lines = read_replies(config.out)
    assert len({line["prompt_id"] for line in lines}) == 5
    assert all(len(line["replies"]) == len(line["finish"]) == len(set(line["seeds"])) == 3 for line in lines)
    assert {line["source"] for line in lines} == {"harmless-base", "helpful-base"}
    settings = json.loads((Path(config.out) / "replies.json").read_text())
    assert settings["weights_fingerprint"] == model.config.weights_fingerprint and settings["k"] == 3
    with pytest.raises(ValueError, match="temperature"):
        sample_replies(SampleConfig(**{**config.__dict__, "temperature": 0.5}), model, progress=False)
    with pytest.raises(ValueError, match="k must be at least 2"):
        SampleConfig(prompts=str(prompts), out=str(tmp_path / "x"), k=1)


def test_skipping_prompts_samples_the_rest_with_the_same_seeds_into_a_new_folder(make_model, tmp_path):
    model = make_model(randomize=False)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 5)
    whole = SampleConfig(prompts=str(prompts), out=str(tmp_path / "whole"), k=2, max_new_tokens=4, limit=4)
    sample_replies(whole, model, progress=False)
    first = SampleConfig(**{**whole.__dict__, "out": str(tmp_path / "first"), "limit": 2})
    rest = SampleConfig(**{**whole.__dict__, "out": str(tmp_path / "rest"), "skip": 2})
    sample_replies(first, model, progress=False)
    assert sample_replies(rest, model, progress=False)["total"] == 2
    by_id = {line["prompt_id"]: line for line in read_replies(whole.out)}
    parts = read_replies(first.out) + read_replies(rest.out)
    # together the two folders hold the same prompts and, reply by reply, the same seeds and replies as one folder
    assert sorted(line["prompt_id"] for line in parts) == sorted(by_id)
    assert all((line["seeds"], line["replies"]) == (by_id[line["prompt_id"]]["seeds"], by_id[line["prompt_id"]]["replies"]) for line in parts)
    with pytest.raises(ValueError, match="skip=4 leaves no prompts"):
        sample_replies(SampleConfig(**{**whole.__dict__, "out": str(tmp_path / "none"), "skip": 4}), model, progress=False)
    with pytest.raises(ValueError, match="skip must be a non-negative integer, got -1"):
        SampleConfig(prompts=str(prompts), out=str(tmp_path / "x"), skip=-1)


def test_replies_sampled_from_an_opening_start_with_it_and_record_it(make_model, tmp_path):
    from paretoalign.generation import render_prompt

    model = make_model(randomize=False)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 2)
    opening = ["I'm sorry, but", "Sure"]
    config = SampleConfig(prompts=str(prompts), out=str(tmp_path / "openings"), k=3, max_new_tokens=5, reply_prefixes=opening)
    sample_replies(config, model, progress=False)
    for line in read_replies(config.out):
        assert [reply[: len(opening[i % 2])] for i, reply in enumerate(line["replies"])] == [opening[0], opening[1], opening[0]]
    assert json.loads((Path(config.out) / "replies.json").read_text())["reply_prefixes"] == opening
    # the backbone continues the started assistant message instead of opening a new one
    rendered = render_prompt(model.tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "I'm sorry, but"}])
    assert rendered.endswith("I'm sorry, but") and rendered.startswith(render_prompt(model.tokenizer, "Hi"))
    with pytest.raises(ValueError, match="reply_prefixes must be a non-empty list"):
        SampleConfig(prompts=str(prompts), out=str(tmp_path / "x"), reply_prefixes=["ok", " "])
    with pytest.raises(ValueError, match="reply_prefixes must be a non-empty list"):
        SampleConfig(prompts=str(prompts), out=str(tmp_path / "x"), reply_prefixes="I'm sorry")


def in_memory_cache(states: list[np.ndarray]) -> FeatureCache:
    """A cache of one-token prompts (state 0) and replies whose states are ``states[i]`` ``(L, d)``."""
    hidden = [np.concatenate([np.zeros((1, s.shape[1])), s]) for s in states]
    lengths = [len(h) for h in hidden]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return FeatureCache(Path("."), np.zeros(offsets[-1], dtype=np.int32), np.concatenate(hidden).astype(np.float16), offsets)


def test_onpolicy_pairs_are_labelled_by_each_teacher_where_it_is_confident():
    # Two features: the first is what helpfulness rewards, the second what harmlessness rewards.
    replies = [[3.0, 0.0], [0.0, 3.0], [1.0, 1.0], [1.0, 1.0], [2.0, 0.0], [0.0, 0.0]]
    cache = in_memory_cache([np.array([r]) for r in replies])
    groups = [
        OnPolicyGroup(np.array([0, 1, 2]), 1, "harmless-base", ["comply", "refuse", "hedge"]),
        OnPolicyGroup(np.array([3, 4, 5]), 1, "helpful-base", ["same", "answer", "same "]),
    ]
    teachers = {
        "helpfulness": Teacher(np.array([1.0, 0.0], dtype=np.float32), np.ones(2, dtype=np.float32), threshold=1.5),
        "harmlessness": Teacher(np.array([0.0, 1.0], dtype=np.float32), np.ones(2, dtype=np.float32), threshold=1.5),
    }
    labelled, rewards, report = label_onpolicy(cache, teachers, groups, {"harmlessness": ["harmless-base"]})
    assert np.allclose(rewards["helpfulness"], [3, 0, 1, 1, 2, 0])
    # helpfulness: (0 > 1) margin 3, (0 > 2) margin 2; (1, 2) margin 1 is below the threshold; the second prompt's
    # first and third replies are the same text and make no pair; (4 > 3) margin 1 is too small, (4 > 5) margin 2.
    assert sorted(zip(labelled["helpfulness"].chosen, labelled["helpfulness"].rejected)) == [(0, 1), (0, 2), (4, 5)]
    # harmlessness labels red-team prompts only: (1 > 0) margin 3, (1 > 2) margin 2.
    assert sorted(zip(labelled["harmlessness"].chosen, labelled["harmlessness"].rejected)) == [(1, 0), (1, 2)]
    assert report["harmless-base"] == {
        "prompts": 1, "pairs": 3, "kept_helpfulness": 2, "kept_harmlessness": 2, "both_labelled": 1, "disagree": 1.0
    }
    assert report["helpful-base"]["pairs"] == 2 and report["helpful-base"]["kept_harmlessness"] == 0
    # On benign prompts the helpfulness teacher may label harmlessness: its pairs there are helpfulness's.
    labelled, _, report = label_onpolicy(cache, teachers, groups, {}, {"harmlessness": {"helpful-base": "helpfulness"}})
    assert sorted(zip(labelled["harmlessness"].chosen, labelled["harmlessness"].rejected)) == [(1, 0), (1, 2), (4, 5)]
    assert report["helpful-base"]["both_labelled"] == 1 and report["helpful-base"]["disagree"] == 0.0


def test_rules_label_pairs_between_two_folders_by_construction():
    # One benign prompt: replies 0, 1 sampled freely (folder "free"), 2, 3 from a declining opening ("declines").
    replies = [[0.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 0.0]]
    cache = in_memory_cache([np.array([r]) for r in replies])
    folders = ["d/free", "d/free", "d/declines", "d/declines/"]  # a trailing slash names the same folder
    groups = [OnPolicyGroup(np.array([0, 1, 2, 3]), 1, "helpful-base", ["a", "b", "c", "d"], "p", folders)]
    teachers = {
        "helpfulness": Teacher(np.array([1.0, 0.0], dtype=np.float32), np.ones(2, dtype=np.float32), threshold=1.5),
        "harmlessness": Teacher(np.array([0.0, 1.0], dtype=np.float32), np.ones(2, dtype=np.float32), threshold=1.5),
    }
    rule = {"objectives": ["harmlessness"], "sources": ["helpful-base"], "prefer": "d/free", "over": "d/declines"}
    labelled, _, report = label_onpolicy(cache, teachers, groups, rules=[rule])
    # harmlessness: every free-vs-declining pair, free first (the teacher sees no difference and labels none of them)
    assert sorted(zip(labelled["harmlessness"].chosen, labelled["harmlessness"].rejected)) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    # helpfulness keeps its teacher: (2 > 0) margin 3, (1 > 0) and (1 > 3) margin 2, (2 > 3) margin 3
    assert sorted(zip(labelled["helpfulness"].chosen, labelled["helpfulness"].rejected)) == [(1, 0), (1, 3), (2, 0), (2, 3)]
    assert report["helpful-base"]["by_rule_harmlessness"] == 4 and report["helpful-base"]["by_rule_helpfulness"] == 0
    # a rule for other prompts labels nothing
    labelled, _, _ = label_onpolicy(cache, teachers, groups, rules=[{**rule, "sources": ["harmless-base"]}])
    assert len(labelled["harmlessness"].chosen) == 0


def test_a_rule_can_keep_only_pairs_the_refusal_detector_tells_apart():
    # One harmful prompt: two free replies (one complies, one declines) and two from a declining opening (one declines,
    # one goes on to comply). Only (declining-opening reply that declines, free reply that complies) is ruled.
    replies = [[0.0, 0.0]] * 4
    cache = in_memory_cache([np.array([r]) for r in replies])
    texts = ["Sure, here is how.", "I'm sorry, but I can't help with that.", "I'm sorry, but I won't.", "I can't imagine a better plan: step 1, buy it."]
    folders = ["d/free", "d/free", "d/declines", "d/declines"]
    groups = [OnPolicyGroup(np.array([0, 1, 2, 3]), 1, "harmless-base", texts, "p", folders)]
    teachers = {
        name: Teacher(np.zeros(2, dtype=np.float32), np.ones(2, dtype=np.float32), threshold=1.0)
        for name in ("helpfulness", "harmlessness")
    }  # the teachers label nothing: every label below is the rule's
    rule = {"objectives": ["harmlessness"], "sources": ["harmless-base"], "prefer": "d/declines", "over": "d/free"}
    labelled, _, _ = label_onpolicy(cache, teachers, groups, rules=[rule])
    assert sorted(zip(labelled["harmlessness"].chosen, labelled["harmlessness"].rejected)) == [(2, 0), (2, 1), (3, 0), (3, 1)]
    labelled, _, report = label_onpolicy(cache, teachers, groups, rules=[{**rule, "refuses": "prefer"}])
    assert sorted(zip(labelled["harmlessness"].chosen, labelled["harmlessness"].rejected)) == [(2, 0)]
    assert report["harmless-base"]["by_rule_harmlessness"] == 1
    # "over": the reply the rule ranks lower must be the one that declines (free complies over declining-opening declines)
    helpful = {"objectives": ["helpfulness"], "sources": ["harmless-base"], "prefer": "d/free", "over": "d/declines", "refuses": "over"}
    labelled, _, _ = label_onpolicy(cache, teachers, groups, rules=[helpful])
    assert sorted(zip(labelled["helpfulness"].chosen, labelled["helpfulness"].rejected)) == [(0, 2)]


def test_feature_cache_copies_the_sequences_it_already_holds(make_model, tmp_path, monkeypatch):
    model = make_model(randomize=False)
    rng = np.random.default_rng(0)
    old = [rng.integers(3, 200, size=n).tolist() for n in (5, 9, 12, 7)]
    new = [rng.integers(3, 200, size=n).tolist() for n in (6, 11)]
    first = build_feature_cache(model, old, tmp_path, progress=False)
    computed = []
    real_batches = features_module._batches
    monkeypatch.setattr(features_module, "_batches", lambda *a: computed.extend(real_batches(*a)) or real_batches(*a))
    both = build_feature_cache(model, [new[0], *old, new[1]], tmp_path, progress=False)
    assert sorted(i for batch in computed for i in batch) == [0, 5]  # only the two new sequences ran the backbone
    assert json.loads((both.directory / "meta.json").read_text())["reused_sequences"] == 4
    for i, sequence in enumerate(old):
        np.testing.assert_array_equal(both.sequence(i + 1)[1], first.sequence(i)[1])
        np.testing.assert_array_equal(both.sequence(i + 1)[0], sequence)
    alone = build_feature_cache(model, new, tmp_path / "alone", progress=False)
    np.testing.assert_allclose(np.asarray(both.sequence(5)[1], np.float32), np.asarray(alone.sequence(1)[1], np.float32), atol=2e-3)
    # A donor built by another backbone (a different header) gives nothing.
    for meta_path in tmp_path.glob("*/meta.json"):
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps({**meta, "header": {**meta["header"], "backbone": "other"}}))
    monkeypatch.setattr(features_module, "_batches", real_batches)
    again = build_feature_cache(model, [*old, [5, 6, 7]], tmp_path, progress=False)
    assert json.loads((again.directory / "meta.json").read_text())["reused_sequences"] == 0


def test_a_bf16_feature_cache_is_its_own_cache_and_close_to_the_fp32_one(make_model, tmp_path):
    model = make_model(randomize=False)
    rng = np.random.default_rng(1)
    sequences = [rng.integers(3, 200, size=n).tolist() for n in (5, 9, 12)]
    fp32 = build_feature_cache(model, sequences, tmp_path, progress=False)
    bf16 = build_feature_cache(model, sequences, tmp_path, progress=False, compute_dtype="bfloat16")
    assert bf16.directory != fp32.directory  # bf16 states never stand in for fp32 ones, nor donate to them
    assert json.loads((bf16.directory / "meta.json").read_text())["reused_sequences"] == 0
    assert json.loads((bf16.directory / "meta.json").read_text())["header"]["compute_dtype"] == "bfloat16"
    assert "compute_dtype" not in json.loads((fp32.directory / "meta.json").read_text())["header"]  # fp32 keys as before
    for i in range(len(sequences)):
        exact, rounded = (np.asarray(cache.sequence(i)[1], np.float32) for cache in (fp32, bf16))
        assert not np.array_equal(exact, rounded)  # the matmuls really ran in bf16
        relative = np.linalg.norm(rounded - exact, axis=-1) / np.linalg.norm(exact, axis=-1)
        assert relative.mean() < 0.05, relative
    assert build_feature_cache(model, sequences, tmp_path, progress=False, compute_dtype="bfloat16").directory == bf16.directory
    with pytest.raises(ValueError, match="feature_dtype must be one of .*'float16'"):
        build_feature_cache(model, sequences, tmp_path, progress=False, compute_dtype="float16")


def test_onpolicy_pairs_join_training_and_reuse_the_cache(backbone, tokenizer, make_model, small_data, tmp_path):
    from paretoalign.model import DualHeadModel
    from paretoalign.train import TrainConfig, prepare_data

    prompts = write_prompts(tmp_path / "prompts.jsonl", 6)
    folder = tmp_path / "replies"
    sample_replies(SampleConfig(prompts=str(prompts), out=str(folder), k=3, max_new_tokens=8), make_model(randomize=False), progress=False)
    settings = dict(
        output_dir=str(tmp_path / "run"), backbone="tiny", data_dir=str(small_data), feature_cache=str(tmp_path / "features"),
        max_train_pairs=16, max_eval_pairs=6, max_length=96, max_prompt_length=64, model={"gate_size": 16, "gate_heads": 2},
        teacher_accuracy=0.5, candidate_tokens=8,
    )
    model = DualHeadModel(backbone, tokenizer, TrainConfig(**settings).model_config())
    plain = prepare_data(TrainConfig(**settings), model, progress=False)
    config = TrainConfig(**settings, onpolicy=[str(folder)], onpolicy_sources={"harmlessness": ["harmless-base"]})
    data = prepare_data(config, model, progress=False)
    meta = json.loads((data.cache.directory / "meta.json").read_text())
    assert meta["reused_sequences"] == len(plain.cache) and len(data.cache) == len(plain.cache) + 6 * 3
    report = data.teacher_report["onpolicy"]
    assert set(report) == {"harmless-base", "helpful-base"} and report["helpful-base"]["kept_harmlessness"] == 0
    for name in config.objectives:
        added = len(data.train[name].chosen) - len(plain.train[name].chosen)
        assert added == sum(entry[f"kept_{name}"] for entry in report.values())
        assert np.all(data.train[name].chosen[len(plain.train[name].chosen) :] >= len(plain.cache))  # the sampled replies
    assert len(data.candidates.offsets) == len(data.cache) + 1
    # batches say which replies the backbone sampled; with lm_loss_replies "written" the gate's LM loss skips them
    from dataclasses import replace

    from paretoalign.train import training_loss

    name = "harmlessness"
    index, human = data.train[name], len(plain.train[name].chosen)
    sampled_ids, written_ids = np.arange(human, len(index.chosen))[:3], np.arange(3)
    assert len(sampled_ids) and data.collate(index, sampled_ids).sampled.all() and not data.collate(index, written_ids).sampled.any()
    written = replace(config, lm_loss_replies="written")
    for ids, expect_lm in ((sampled_ids, False), (written_ids, True)):
        batches = [data.collate(index, ids), data.collate(index, ids)]
        _, every = training_loss(model, batches, torch.tensor([0.5, 0.5]), config)
        _, only_written = training_loss(model, batches, torch.tensor([0.5, 0.5]), written)
        assert every["lm_loss"] > 0 and (only_written["lm_loss"] > 0) == expect_lm
        if expect_lm:
            assert only_written["lm_loss"] == pytest.approx(every["lm_loss"])
    with pytest.raises(ValueError, match="lm_loss_replies must be 'all' or 'written', got 'human'"):
        TrainConfig(**settings, lm_loss_replies="human")
    # a second folder sampling the same prompts joins each prompt's group, so pairs form across the two folders
    openings = tmp_path / "openings"
    sample_replies(
        SampleConfig(prompts=str(prompts), out=str(openings), k=2, max_new_tokens=8, reply_prefixes=["I can't"]), make_model(randomize=False), progress=False
    )
    both = prepare_data(TrainConfig(**settings, onpolicy=[str(folder), str(openings)]), model, progress=False)
    assert len(both.onpolicy_scores) == 6
    assert all(line["folders"] == [str(folder)] * 3 + [str(openings)] * 2 for line in both.onpolicy_scores)
    assert all(len(values) == 5 for line in both.onpolicy_scores for values in line["teacher_rewards"].values())
    assert sum(entry["pairs"] for entry in both.teacher_report["onpolicy"].values()) <= 6 * 10
    assert sum(entry["pairs"] for entry in both.teacher_report["onpolicy"].values()) > sum(entry["pairs"] for entry in report.values()) + 6
    with pytest.raises(ValueError, match="onpolicy_sources must map objectives"):
        TrainConfig(**settings, onpolicy_sources={"honesty": []})
    rule = {"objectives": ["harmlessness"], "sources": ["helpful-base"], "prefer": str(folder), "over": str(tmp_path / "elsewhere")}
    with pytest.raises(ValueError, match=r"onpolicy_rules\[1\] prefer and over must be folders of onpolicy"):
        TrainConfig(**settings, onpolicy=[str(folder)], onpolicy_rules=[rule])
    with pytest.raises(ValueError, match=r"onpolicy_rules\[1\] objectives must be"):
        TrainConfig(**settings, onpolicy=[str(folder)], onpolicy_rules=[{**rule, "objectives": ["honesty"]}])
    with pytest.raises(ValueError, match=r"onpolicy_rules\[1\] prefer and over must be two different folders"):
        TrainConfig(**settings, onpolicy=[str(folder)], onpolicy_rules=[{**rule, "over": str(folder) + "/"}])
    with pytest.raises(ValueError, match=r"onpolicy_rules\[1\] prefer and over must be folders"):
        TrainConfig(**settings, onpolicy=[str(folder)], onpolicy_rules=[{**rule, "prefer": 3}])
    with pytest.raises(ValueError, match=r"onpolicy_rules\[1\] refuses must be 'prefer' or 'over'"):
        TrainConfig(**settings, onpolicy=[str(folder)], onpolicy_rules=[{**rule, "refuses": "both"}])
    with pytest.raises(ValueError, match=r"onpolicy_rules\[1\] must have the keys .* got keys \['objectives', 'over', 'prefer', 'source'"):
        TrainConfig(**settings, onpolicy=[str(folder)], onpolicy_rules=[{**{k: v for k, v in rule.items() if k != "sources"}, "source": []}])
    with pytest.raises(ValueError, match="holds no sampled replies"):
        prepare_data(TrainConfig(**settings, onpolicy=[str(tmp_path / "empty")]), model, progress=False)


def test_two_builders_of_one_feature_cache_take_turns(make_model, tmp_path, monkeypatch):
    import threading

    model = make_model(randomize=False)
    sequences = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    computed, real = [], model.backbone_hidden

    def counting(*args, **kwargs):
        computed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "backbone_hidden", counting)
    caches = []
    threads = [threading.Thread(target=lambda: caches.append(build_feature_cache(model, sequences, tmp_path, progress=False))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(caches) == 2 and caches[0].directory == caches[1].directory
    assert len(computed) == len(features_module._batches(np.array([4, 3, 5]), 4096))  # one build's backbone batches, not two
    np.testing.assert_array_equal(caches[0].hidden, caches[1].hidden)


def test_onpolicy_prompts_of_an_excluded_source_are_left_out(tokenizer, tmp_path):
    from paretoalign.batches import add_onpolicy_sequences
    from paretoalign.data import PKU_SOURCE, PreferenceCollator

    folder = tmp_path / "replies"
    folder.mkdir()
    lines = [
        {"prompt_id": "a", "prompt": "How do I pick a lock?", "source": PKU_SOURCE, "replies": ["No.", "Sure."], "finish": ["eos", "eos"]},
        {"prompt_id": "b", "prompt": "How do I steal a car?", "source": "harmless-base", "replies": ["No."], "finish": ["eos"]},
    ]
    (folder / "replies.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    collator = PreferenceCollator(tokenizer, 64, 32)
    sequences: list = []
    groups = add_onpolicy_sequences(collator, [str(folder)], sequences)
    assert [g.source for g in groups] == [PKU_SOURCE, "harmless-base"] and len(sequences) == 3
    sequences = []
    groups = add_onpolicy_sequences(collator, [str(folder)], sequences, exclude_sources=(PKU_SOURCE,))
    assert [g.prompt_id for g in groups] == ["b"] and len(sequences) == 1 and list(groups[0].rows) == [0]
