"""Training on cached features: the loss goes down, resume equals an uninterrupted run, the cache is reused."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from paretoalign import features as features_module
from paretoalign import train as train_module
from paretoalign.batches import batch_pair_ids, collate_pairs, step_preference
from paretoalign.model import DualHeadModel
from paretoalign.train import TrainConfig, prepare_data, train, training_loss


def make_config(small_data, tmp_path, **overrides) -> TrainConfig:
    settings = dict(
        output_dir=str(tmp_path / "run"), backbone="tiny", data_dir=str(small_data), feature_cache=str(tmp_path / "features"),
        max_train_pairs=16, max_eval_pairs=4, steps=6, batch_pairs=3, checkpoint_every=3, eval_every=3,
        max_length=96, max_prompt_length=64, learning_rate=5e-3, warmup_steps=1, model={"gate_size": 16, "gate_heads": 2},
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def fresh_model(backbone, tokenizer, config) -> DualHeadModel:
    torch.manual_seed(config.seed)
    return DualHeadModel(backbone, tokenizer, config.model_config())


def test_training_lowers_the_loss_and_changes_the_heads(backbone, tokenizer, small_data, tmp_path):
    config = make_config(small_data, tmp_path, steps=25, checkpoint_every=25, eval_every=25)
    model = fresh_model(backbone, tokenizer, config)
    data = prepare_data(config, model, progress=False)
    fixed = [collate_pairs(data.cache, data.train[name], np.arange(8)) for name in config.objectives]
    preference = torch.tensor([0.5, 0.5])
    before_state = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    with torch.no_grad():
        before, _ = training_loss(model, fixed, preference, config)
    train(config, model, progress=False)
    with torch.no_grad():
        after, _ = training_loss(model, fixed, preference, config)
    assert after < before - 0.05
    changed = [name for name, value in model.trainable_state_dict().items() if not torch.equal(value, before_state[name])]
    assert any("lora_B" in name for name in changed) and any("context_gate" in name for name in changed)
    assert all(not p.requires_grad for p in model.backbone.parameters())
    log = [json.loads(line) for line in (Path(config.output_dir) / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 26))
    assert {"helpfulness/rewards/chosen", "harmlessness/rewards/rejected", "lm_loss", "gate_loss"} <= set(log[0])
    assert "val/helpfulness/accuracy@1,0" in log[-1]
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    assert summary["closing_gate_mean"] == pytest.approx(sum(r["gate_mean"] for r in log) / len(log))
    loaded = DualHeadModel.from_pretrained(Path(config.output_dir) / "model", backbone=backbone, tokenizer=tokenizer)
    for name, value in loaded.trainable_state_dict().items():
        assert torch.equal(value, model.trainable_state_dict()[name])


def test_resumed_run_ends_where_an_uninterrupted_one_does(backbone, tokenizer, small_data, tmp_path, monkeypatch):
    whole = make_config(small_data, tmp_path / "whole")
    uninterrupted = train(whole, fresh_model(backbone, tokenizer, whole), progress=False).trainable_state_dict()

    broken = make_config(small_data, tmp_path / "broken")
    real_loss, calls = train_module.training_loss, []

    def interrupted_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # step 5: after the checkpoint at step 3 and the log line of step 4
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_loss", interrupted_loss)
    with pytest.raises(KeyboardInterrupt):
        train(broken, fresh_model(backbone, tokenizer, broken), progress=False)
    monkeypatch.setattr(train_module, "training_loss", real_loss)
    resumed = train(broken, fresh_model(backbone, tokenizer, broken), progress=False).trainable_state_dict()

    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)
    logs = [
        [json.loads(line) for line in (Path(c.output_dir) / "training_log.jsonl").read_text().splitlines()] for c in (whole, broken)
    ]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in logs[1]] == [r["loss"] for r in logs[0]]


def test_feature_cache_is_reused_and_resumes(backbone, tokenizer, small_data, tmp_path, monkeypatch):
    config = make_config(small_data, tmp_path, max_batch_tokens=128)
    model = fresh_model(backbone, tokenizer, config)
    calls = []
    handle = backbone.base_model.register_forward_hook(lambda *args: calls.append(1))
    real_write = features_module._write_json

    def failing_write(path, data):
        if data.get("done_batches") == 3 and not data.get("complete"):
            raise KeyboardInterrupt
        real_write(path, data)

    try:
        monkeypatch.setattr(features_module, "_write_json", failing_write)
        with pytest.raises(KeyboardInterrupt):
            prepare_data(config, model, progress=False)
        monkeypatch.setattr(features_module, "_write_json", real_write)
        interrupted_calls = len(calls)
        first = prepare_data(config, model, progress=False)
        resumed_calls = len(calls) - interrupted_calls
        again = prepare_data(config, model, progress=False)
        assert len(calls) - interrupted_calls == resumed_calls  # the complete cache ran no backbone pass
    finally:
        handle.remove()
    assert first.cache.directory == again.cache.directory
    total_batches = json.loads((first.cache.directory / "meta.json").read_text())["done_batches"]
    assert interrupted_calls == 3 and resumed_calls == total_batches - 2  # batch 3 is computed again
    fresh = features_module.build_feature_cache(model, [list(first.cache.sequence(i)[0]) for i in range(len(first.cache))],
                                                tmp_path / "fresh", max_batch_tokens=4096, progress=False)
    np.testing.assert_allclose(np.asarray(fresh.hidden, dtype=np.float32), np.asarray(first.cache.hidden, dtype=np.float32), atol=2e-3)


def test_preferences_and_batches_are_pure_functions_of_the_step():
    assert torch.equal(step_preference(2, 7, 0, 1.0), step_preference(2, 7, 0, 1.0))
    assert not torch.equal(step_preference(2, 7, 0, 1.0), step_preference(2, 8, 0, 1.0))
    first = batch_pair_ids(10, 4, 2, 0, 0)
    assert np.array_equal(first, batch_pair_ids(10, 4, 2, 0, 0))
    epoch = np.concatenate([batch_pair_ids(10, 5, s, 0, 0) for s in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))  # an epoch visits every pair once


def test_a_written_pair_share_fixes_how_many_human_pairs_each_step_draws():
    from paretoalign.batches import PairIndex, step_pair_ids

    # 4 human-written pairs (sequences 0-7) and 40 pairs of sampled replies (sequences from 8 on), shuffled together
    rows = np.random.default_rng(0).permutation(44)
    chosen = np.where(rows < 4, 2 * rows, 8 + 2 * rows)
    index = PairIndex(chosen, chosen + 1, np.zeros(44, np.int64))
    plain_index, plain = step_pair_ids(index, 8, 8, 3, 0, 0)
    assert plain_index is index and np.array_equal(plain, batch_pair_ids(44, 8, 3, 0, 0))
    human = []
    for step in range(5):
        pool, ids = step_pair_ids(index, 8, 8, step, 0, 0, 0.5, "harmlessness")
        assert len(ids) == 8 and (pool.chosen[ids] < 8).sum() == 4  # half the step from the 4 human pairs
        assert np.array_equal(ids, step_pair_ids(index, 8, 8, step, 0, 0, 0.5, "harmlessness")[1])  # pure in the step
        assert len(set(pool.chosen[ids].tolist())) == 8  # no pair twice in a step
        human += pool.chosen[ids][pool.chosen[ids] < 8].tolist()
    assert sorted(human) == sorted([0, 2, 4, 6] * 5)  # each human pair once per step, against 40 steps' worth drawn uniformly
    _, only_sampled = step_pair_ids(index, 8, 8, 0, 0, 0, 0.0)
    assert len(only_sampled) == 8
    with pytest.raises(ValueError, match=r"written_pair_share\['harmlessness'\] 0.5 draws on-policy pairs, but harmlessness has none"):
        step_pair_ids(index, None, 8, 0, 0, 0, 0.5, "harmlessness")


def test_a_run_saved_before_a_config_field_existed_still_resumes(small_data, tmp_path):
    from paretoalign.files import record_run_config

    config = make_config(small_data, tmp_path)
    saved = tmp_path / "train_config.json"
    older = {name: value for name, value in config.to_dict().items() if name != "written_pair_share"}
    saved.write_text(json.dumps(older))
    record_run_config(saved, config)  # the field the file lacks is at its default: the same run
    assert json.loads(saved.read_text())["written_pair_share"] == {}
    moved = TrainConfig(**{**config.to_dict(), "output_dir": str(tmp_path / "elsewhere")})
    record_run_config(saved, moved, write=False)  # where the folder is, is no setting
    for changed in ({**older, "steps": 7}, {**older, "written_pair_share": {"harmlessness": 0.5}}, {**older, "retired_field": 1}):
        saved.write_text(json.dumps(changed))
        with pytest.raises(ValueError, match="holds a different config; use a new output directory or the same settings"):
            record_run_config(saved, config)


def test_bad_train_config_names_the_value(small_data, tmp_path):
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        make_config(small_data, tmp_path, steps=0)
    with pytest.raises(ValueError, match="beta_r must be > 0, got -1"):
        make_config(small_data, tmp_path, beta_r=-1)
    with pytest.raises(ValueError, match="fusion must be one of"):
        make_config(small_data, tmp_path, model={"fusion": "mix"})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"stpes": 3}))
    with pytest.raises(ValueError, match="unknown train config fields \\['stpes'\\]"):
        TrainConfig.from_json(path)
    with pytest.raises(ValueError, match="block_cache_layer must be an integer >= 0 or null, got -2"):
        make_config(small_data, tmp_path, block_cache_layer=-2)
    with pytest.raises(ValueError, match="train_objective must be one of objectives .* got 'honesty'"):
        make_config(small_data, tmp_path, train_objective="honesty", preference_sampling="step")
    with pytest.raises(ValueError, match="needs preference_sampling 'step', got 'objective'"):
        make_config(small_data, tmp_path, train_objective="helpfulness", preference_sampling="objective")


def test_an_objective_can_train_on_its_own_number_of_pairs(backbone, tokenizer, small_data, tmp_path):
    from paretoalign.train import prepare_data

    config = make_config(small_data, tmp_path, max_train_pairs=6, max_train_pairs_by_objective={"helpfulness": 10})
    data = prepare_data(config, fresh_model(backbone, tokenizer, config), progress=False)
    assert len(data.train["helpfulness"].chosen) == 10 and len(data.train["harmlessness"].chosen) == 6
    with pytest.raises(ValueError, match="max_train_pairs_by_objective names 'honesty', not one of the objectives"):
        make_config(small_data, tmp_path, max_train_pairs_by_objective={"honesty": 3})
    with pytest.raises(ValueError, match=r"max_train_pairs_by_objective\['helpfulness'\] must be a positive integer or null, got 0"):
        make_config(small_data, tmp_path, max_train_pairs_by_objective={"helpfulness": 0})
    with pytest.raises(ValueError, match="written_pair_share names 'honesty'"):
        make_config(small_data, tmp_path, written_pair_share={"honesty": 0.5})
    with pytest.raises(ValueError, match=r"written_pair_share\['harmlessness'\] must be a number in \[0, 1\], got 1.5"):
        make_config(small_data, tmp_path, written_pair_share={"harmlessness": 1.5})
    with pytest.raises(ValueError, match=r"written_pair_share\['harmlessness'\] 0.01 rounds to 0 of batch_pairs"):
        make_config(small_data, tmp_path, written_pair_share={"harmlessness": 0.01})
    with pytest.raises(ValueError, match=r"written_pair_share\['harmlessness'\] 0.5 leaves room for on-policy pairs, but onpolicy is empty"):
        make_config(small_data, tmp_path, written_pair_share={"harmlessness": 0.5})


def test_one_objectives_reward_model_learns_from_its_pairs_only(backbone, tokenizer, small_data, tmp_path):
    """GenARM's recipe (train_objective, no gate): every step at the objective's one-hot; the other objective's pairs
    never reach the gradient, so swapping them leaves it unchanged."""
    model_settings = {"gate_size": 16, "gate_heads": 2, "fixed_gate": 1.0, "fusion": "genarm"}
    config = make_config(
        small_data, tmp_path, steps=4, train_objective="harmlessness", preference_sampling="step", model=model_settings
    )
    model = fresh_model(backbone, tokenizer, config)
    train(config, model, progress=False)
    log = [json.loads(line) for line in (Path(config.output_dir) / "training_log.jsonl").read_text().splitlines()]
    assert [r["preference"] for r in log] == [[0.0, 1.0]] * 4

    data = prepare_data(config, model, progress=False)
    batches = [collate_pairs(data.cache, data.train[name], np.arange(3)) for name in config.objectives]
    swapped = [collate_pairs(data.cache, data.train["helpfulness"], np.arange(3, 6)), batches[1]]
    one_hot = torch.tensor([0.0, 1.0])
    grads = []
    for pairs in (batches, swapped):
        model.zero_grad()
        training_loss(model, pairs, one_hot, config)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_model_overrides_merge_into_the_config_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": {"gate_heads": 2, "gate_size": 16}}))
    config = TrainConfig.from_json(path, model={"reward_layers": 2}, steps=None)
    assert config.model == {"gate_heads": 2, "gate_size": 16, "reward_layers": 2} and config.steps == 300


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs").rglob("*.json")), ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    config = TrainConfig.from_json(path)
    model_config = config.model_config()
    assert config.output_dir.startswith("runs/")
    if path.parent.name == "ablations":
        default = TrainConfig.from_json(path.parent.parent / "default.json")
        assert config.to_dict() != default.to_dict()
        assert config.steps == default.steps and config.learning_rate == default.learning_rate
    assert model_config.objectives == ["helpfulness", "harmlessness"]


def test_export_ships_weights_log_accuracy_and_card(backbone, tokenizer, small_data, tmp_path, monkeypatch):
    from paretoalign import export as export_module

    backbone_dir = tmp_path / "tiny-backbone"
    backbone.save_pretrained(backbone_dir)
    tokenizer.save_pretrained(backbone_dir)
    config = make_config(small_data, tmp_path, backbone=str(backbone_dir), steps=3, teacher_objectives=["helpfulness"], lambda_z=0.002)
    train(config, fresh_model(backbone, tokenizer, config), progress=False)
    real_loader = export_module.load_default_pairs
    monkeypatch.setattr(export_module, "load_default_pairs", lambda: real_loader(data_dir=small_data))
    assert DualHeadModel.from_pretrained(Path(config.output_dir) / "model").config.strength != 2.5
    results = export_module.export_run(config.output_dir, tmp_path / "checkpoints" / "default", progress=False, strength=2.5)
    shipped = tmp_path / "checkpoints" / "default"
    names = {p.name for p in shipped.iterdir()}
    assert {"dualhead_config.json", "dualhead_model.safetensors", "training_log.jsonl", "README.md", "test_accuracy.json"} <= names
    # The run had a teacher, refit from its caches: the other objective's test pairs checked against it.
    conflicts = json.loads((shipped / "test_conflicts.json").read_text())
    assert set(conflicts) == {"harmlessness-vs-helpfulness"}  # the helpfulness teacher on harmlessness pairs
    assert all(entry["pairs"] <= results[name.split("-vs-")[0]][0]["n"] for name, entry in conflicts.items())
    assert [r["preference"] for r in results["harmlessness"]] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    parts = [name for name in results if name.startswith("harmlessness · ")]
    if parts:  # each source of a mixed objective gets its own row; the objective's row pools them
        assert sum(results[name][0]["n"] for name in parts) == results["harmlessness"][0]["n"]
        pooled = sum(results[name][2]["accuracy"] * results[name][2]["n"] for name in parts) / results["harmlessness"][2]["n"]
        assert results["harmlessness"][2]["accuracy"] == pytest.approx(pooled)
    card = (shipped / "README.md").read_text()
    assert "Held-out accuracy" in card and f"{results['helpfulness'][0]['accuracy']:.3f}" in card
    assert "+ 0.002 · E_t[z_t²]" in card  # the run's gate penalty is in the objective it states
    closing = json.loads((Path(config.output_dir) / "summary.json").read_text())["closing_gate_mean"]
    assert f"mean α over the last 100 training steps: {closing:.3f}." in card
    assert ("The gate is shut" in card) == (closing < 0.01)
    reloaded = DualHeadModel.from_pretrained(shipped)
    assert reloaded.config.backbone == str(backbone_dir)
    assert reloaded.config.strength == 2.5 and "strength 2.5" in card  # the decoding default chosen for shipping
    with pytest.raises(ValueError, match="strength must be >= 0, got -1.0"):
        export_module.export_run(config.output_dir, tmp_path / "checkpoints" / "other", progress=False, strength=-1)
    assert not (tmp_path / "checkpoints" / "other").exists()
    # A run folder that lost its teachers' report (a checkpoint copied back into a run) gets it from the refit teachers.
    report = json.loads((shipped / "teacher_labels.json").read_text())
    assert report == json.loads((Path(config.output_dir) / "teacher_labels.json").read_text())
    (Path(config.output_dir) / "teacher_labels.json").unlink()
    export_module.export_run(config.output_dir, tmp_path / "checkpoints" / "again", progress=False)
    assert json.loads((tmp_path / "checkpoints" / "again" / "teacher_labels.json").read_text()) == report


def test_the_card_counts_on_policy_pairs_from_the_checkpoint_it_describes(tmp_path):
    from paretoalign.export import _onpolicy_note

    config = {"onpolicy": ["data/onpolicy/harmful"], "objectives": ["helpfulness", "harmlessness"]}
    report = {"onpolicy": {"harmful": {"pairs": 12, "kept_helpfulness": 5, "kept_harmlessness": 7}, "benign": {"pairs": 3, "kept_helpfulness": 2}}}
    (tmp_path / "teacher_labels.json").write_text(json.dumps(report))
    assert "15 pairs, kept 7 for helpfulness, 7 for harmlessness" in _onpolicy_note(config, tmp_path)
    assert "0 pairs, kept 0 for helpfulness" in _onpolicy_note(config, tmp_path / "elsewhere")  # no report: nothing counted
    assert _onpolicy_note({"objectives": ["helpfulness"]}, tmp_path) == ""  # no on-policy pairs: no paragraph


def test_reward_branch_trains_from_a_cache_of_a_lower_block(backbone, tokenizer, small_data, tmp_path):
    from conftest import randomize_adapters

    from paretoalign.objective import PairBatch, score_pairs

    config = make_config(
        small_data, tmp_path, steps=4, checkpoint_every=4, eval_every=4, block_cache_layer=0,
        model={"gate_size": 16, "gate_heads": 2, "reward_layers": 1},
    )
    model = fresh_model(backbone, tokenizer, config)
    data = prepare_data(config, model, progress=False)
    assert data.block_layer == 0 and len(data.block_cache) == len(data.cache)
    randomize_adapters(model)
    index = data.validation["helpfulness"]
    cached = data.collate(index, np.arange(len(index.chosen)))
    hidden, block = model.backbone_states(cached.input_ids, cached.attention_mask)  # a full pass: branch from block 1
    direct = PairBatch(hidden, cached.input_ids, cached.attention_mask, cached.response_mask, block, model.branch_layer)
    rows = torch.tensor([1.0, 0.0]).expand(cached.input_ids.shape[0], -1)
    with torch.no_grad():
        from_cache = score_pairs(model, cached, rows, fused=False).rewards
        from_backbone = score_pairs(model, direct, rows, fused=False).rewards
    torch.testing.assert_close(from_cache, from_backbone, rtol=1e-2, atol=1e-2)  # the cache stores float16
    assert not torch.allclose(from_cache, torch.zeros_like(from_cache))

    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    train(config, model, progress=False)
    changed = {name for name, value in model.trainable_state_dict().items() if not torch.equal(value, before[name])}
    assert any(name.startswith("reward_branch.") for name in changed)
    assert all(not p.requires_grad for name, p in model.reward_branch.named_parameters() if ".lora_" not in name)


def test_block_cache_layer_above_the_branch_is_refused(backbone, tokenizer, small_data, tmp_path):
    config = make_config(small_data, tmp_path, block_cache_layer=2, model={"gate_size": 16, "gate_heads": 2, "reward_layers": 1})
    with pytest.raises(ValueError, match="block_cache_layer must be at most 1"):
        prepare_data(config, fresh_model(backbone, tokenizer, config), progress=False)


def test_reward_learning_rate_applies_to_the_reward_head_and_branch_only(backbone, tokenizer, small_data, tmp_path):
    from paretoalign.train import parameter_groups

    config = make_config(
        small_data, tmp_path, learning_rate=1e-3, reward_learning_rate=5e-3,
        model={"gate_size": 16, "gate_heads": 2, "reward_layers": 1},
    )
    model = fresh_model(backbone, tokenizer, config)
    reward, other = parameter_groups(model, config)
    names = {id(p): n for n, p in model.named_parameters()}
    assert reward["lr"] == 5e-3 and other["lr"] == 1e-3
    assert {names[id(p)].split(".")[0] for p in reward["params"]} == {"reward_head", "reward_branch"}
    assert {names[id(p)].split(".")[0] for p in other["params"]} == {"context_gate"}
    assert len(reward["params"]) + len(other["params"]) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="reward_learning_rate must be > 0 or null, got 0"):
        make_config(small_data, tmp_path, reward_learning_rate=0)


def test_gate_preference_objective_trains_the_gate_only_and_lowers_its_loss(backbone, tokenizer, small_data, tmp_path):
    # lambda_r 0 and lambda_g 0: what is left is the gate's preference loss on the fused gain over the frozen LM
    config = make_config(small_data, tmp_path, gate_objective="preference", lambda_r=0.0, lambda_g=0.0)
    model = fresh_model(backbone, tokenizer, config)
    data = prepare_data(config, model, progress=False)
    batches = [collate_pairs(data.cache, data.train[name], np.arange(6)) for name in config.objectives]
    preference = torch.tensor([0.5, 0.5])
    gate_params = [p for name, p in model.named_parameters() if "context_gate" in name and p.requires_grad]
    head_params = [p for name, p in model.named_parameters() if "context_gate" not in name and p.requires_grad]
    with torch.no_grad():  # a head that moves the log-probs, so the gate has something to let in
        for p in head_params:
            p.normal_(0, 0.05)

    def gate_loss() -> float:
        with torch.no_grad():
            _, stats = training_loss(model, batches, preference, config)
        return stats["helpfulness/gate_pref_loss"] + stats["harmlessness/gate_pref_loss"]

    loss, stats = training_loss(model, batches, preference, config)
    assert stats["lm_loss"] == 0 and {"helpfulness/gate_pref_loss", "harmlessness/gate_accuracy"} <= set(stats)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gate_params)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in head_params)  # the fusion's reward logits are detached
    before = gate_loss()
    optimizer = torch.optim.SGD(gate_params, lr=0.5)
    for _ in range(5):
        optimizer.zero_grad()
        training_loss(model, batches, preference, config)[0].backward()
        optimizer.step()
    assert gate_loss() < before
    with pytest.raises(ValueError, match="gate_objective must be one of .*got 'reward'"):
        make_config(small_data, tmp_path, gate_objective="reward")


def test_gate_logit_penalty_joins_the_gate_loss_and_keeps_its_logits_in_range(backbone, tokenizer, small_data, tmp_path):
    config = make_config(small_data, tmp_path, gate_objective="preference", lambda_r=0.0, lambda_g=0.0)
    penalised = make_config(small_data, tmp_path, gate_objective="preference", lambda_r=0.0, lambda_g=0.0, lambda_z=0.5)
    model = fresh_model(backbone, tokenizer, config)
    data = prepare_data(config, model, progress=False)
    batches = [collate_pairs(data.cache, data.train[name], np.arange(6)) for name in config.objectives]
    preference = torch.tensor([0.5, 0.5])
    gate_params = [p for name, p in model.named_parameters() if "context_gate" in name and p.requires_grad]
    with torch.no_grad():  # a saturated gate: alpha = sigmoid(20) is 1 in float32
        model.context_gate.score.bias.fill_(20.0)
        _, plain = training_loss(model, batches, preference, config)
        _, stats = training_loss(model, batches, preference, penalised)
    assert plain["gate_logit_rms"] == pytest.approx(stats["gate_logit_rms"]) and stats["gate_logit_rms"] > 15
    assert stats["gate_loss"] - plain["gate_loss"] == pytest.approx(0.5 * stats["gate_logit_rms"] ** 2, rel=1e-4)
    optimizer = torch.optim.Adam(gate_params, lr=0.05)  # Adam, as in training: normalised steps
    for _ in range(5):
        optimizer.zero_grad()
        training_loss(model, batches, preference, penalised)[0].backward()
        optimizer.step()
    with torch.no_grad():
        _, after = training_loss(model, batches, preference, penalised)
    assert after["gate_logit_rms"] < stats["gate_logit_rms"] - 1  # pulled back towards where the sigmoid has a slope
    with pytest.raises(ValueError, match="lambda_z must be >= 0, got -1"):
        make_config(small_data, tmp_path, lambda_z=-1)


def test_a_run_whose_gate_closed_says_so(backbone, tokenizer, small_data, tmp_path, caplog):
    from paretoalign.train import closing_gate_mean

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i, "gate_mean": 1.0 if i <= 50 else 0.0}) + "\n" for i in range(1, 151)))
    assert closing_gate_mean(log) == pytest.approx(0.0) and closing_gate_mean(tmp_path / "none.jsonl") is None
    log.write_text("".join(json.dumps({"step": i, "gate_mean": 1.0 if i <= 100 else 0.0}) + "\n" for i in range(1, 151)))
    assert closing_gate_mean(log) == pytest.approx(0.5)  # the last 100 steps only
    config = make_config(small_data, tmp_path, steps=3, checkpoint_every=3, eval_every=3, gate_objective="preference")
    model = fresh_model(backbone, tokenizer, config)
    with torch.no_grad():  # a gate carried to alpha = 0: sigmoid(-40) underflows, and no gradient reopens it
        model.context_gate.score.bias.fill_(-40.0)
    with caplog.at_level("WARNING", logger="paretoalign.train"):
        train(config, model, progress=False)
    assert json.loads((Path(config.output_dir) / "summary.json").read_text())["closing_gate_mean"] < 1e-6
    assert "the gate closed" in caplog.text and "lambda_z" in caplog.text


class _FixedTeacher:
    """A teacher whose verdict on every pair is fixed: ``sign`` > 0 agrees with each human label, < 0 contradicts it."""

    def __init__(self, sign: float):
        self.sign, self.threshold = sign, 0.5

    def margin(self, chosen, rejected):
        return np.full(len(chosen), self.sign)


def test_conflict_pairs_follow_the_preference_or_not(backbone, tokenizer, small_data, tmp_path, monkeypatch):
    from paretoalign import export as export_module

    real_loader = export_module.load_default_pairs
    monkeypatch.setattr(export_module, "load_default_pairs", lambda: real_loader(data_dir=small_data))
    config = make_config(small_data, tmp_path)
    model = fresh_model(backbone, tokenizer, config)
    from conftest import randomize_adapters

    randomize_adapters(model, scale=0.3)
    settings = {"max_length": 64, "max_prompt_length": 32, "feature_cache": tmp_path / "features"}
    accuracy = export_module.held_out_accuracy(model, progress=False, **settings)
    # A harmlessness teacher that contradicts every helpfulness label, and a helpfulness one that agrees with every
    # harmlessness label: every helpfulness test pair conflicts, no harmlessness one does.
    teachers = {"harmlessness": _FixedTeacher(-1.0), "helpfulness": _FixedTeacher(+1.0)}
    conflicts = export_module.held_out_conflicts(model, teachers, progress=False, **settings)
    assert conflicts["harmlessness-vs-helpfulness"] == {"pairs": 0}
    entry = conflicts["helpfulness-vs-harmlessness"]
    first, _, second = accuracy["helpfulness"]  # at (1, 0), (0.5, 0.5), (0, 1)
    gain = second["own_one_hot_gain"]  # helpfulness at its own one-hot (1, 0) minus at (0, 1), on the same pairs
    assert gain["difference"] == pytest.approx(first["accuracy"] - second["accuracy"]) and gain["n"] == first["n"]
    assert "own_one_hot_gain" not in first and "own_one_hot_gain" in accuracy["harmlessness"][0]
    assert entry["pairs"] == first["n"]
    assert entry["agrees-with-helpfulness@1,0"] == pytest.approx(first["accuracy"])
    assert entry["agrees-with-harmlessness@0,1"] == pytest.approx(1.0 - second["accuracy"])
    # A teacher below its threshold labels nothing, so nothing conflicts.
    unsure = _FixedTeacher(-0.1)
    assert export_module.held_out_conflicts(model, {"harmlessness": unsure}, progress=False, **settings) == {
        "helpfulness-vs-harmlessness": {"pairs": 0}
    }
