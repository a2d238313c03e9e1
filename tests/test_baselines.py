"""The reference methods on the tiny model: ARM training and checkpoints, GenARM/PARM/ARGS scores by hand, the sweep."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import MarkerScorer, randomize_adapters

from paretoalign.baselines import arm_training
from paretoalign.baselines.args import ARGSDecoder
from paretoalign.baselines.arm import (
    ARMConfig,
    adapter_parameters,
    bind_preference,
    causal_lm,
    load_arm,
    new_arm,
    top_blocks_hidden,
)
from paretoalign.baselines.arm_training import ARMTrainConfig, arm_training_loss, prepare_arm_data, train_arm
from paretoalign.baselines.unconditioned import UnconditionedDualHeadModel
from paretoalign.batches import collate_pairs
from paretoalign.cli import main
from paretoalign.evaluation.sweep import SweepConfig, read_results, run_sweep
from paretoalign.features import block_input
from paretoalign.generation import generate, prepare_batch
from paretoalign.methods import METHODS, build_decoder
from paretoalign.model import DualHeadConfig, DualHeadModel, position_ids_from_mask

OBJECTIVES = ["helpfulness", "harmlessness"]


def train_config(small_data, tmp_path, method, **overrides) -> ARMTrainConfig:
    settings = {
        "method": method,
        "objective": "helpfulness" if method == "genarm" else None,
        "output_dir": str(tmp_path / method),
        "data_dir": str(small_data),
        "feature_cache": str(tmp_path.parent / "features"),
        "layers": 1,
        "max_train_pairs": 16,
        "max_eval_pairs": 4,
        "steps": 20,
        "batch_pairs": 3,
        "max_length": 96,
        "max_prompt_length": 64,
        "learning_rate": 2e-2,
        "beta_r": 1.0,
        "warmup_steps": 1,
        "checkpoint_every": 10,
        "eval_every": 10,
    }
    return ARMTrainConfig(**{**settings, **overrides})


def full_logits(model, input_ids, attention_mask) -> torch.Tensor:
    """Next-token logits ``(B, V)`` of a whole forward pass, no cache."""
    positions = position_ids_from_mask(attention_mask)
    return causal_lm(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits[:, -1].float()


# ---------------------------------------------------------------------------------------------- ARMs and their training


@pytest.mark.parametrize("method", ["genarm", "parm"])
def test_the_top_blocks_from_the_cached_layer_match_a_full_forward(backbone, tokenizer, method):
    config = ARMConfig.for_backbone(method, OBJECTIVES[:1] if method == "genarm" else OBJECTIVES, backbone, tokenizer, layers=1)
    arm = new_arm(backbone, config)
    randomize_adapters(arm)
    if method == "parm":
        bind_preference(arm, torch.tensor([[0.2, 0.8], [1.0, 0.0]]))
    input_ids = torch.randint(5, 300, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding
    with torch.no_grad():
        top = top_blocks_hidden(
            arm, block_input(backbone, input_ids, attention_mask, config.first_layer), attention_mask, config.first_layer
        )
        full = causal_lm(arm).base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
        )
    real = attention_mask.bool()
    torch.testing.assert_close(top[real], full.last_hidden_state[real])
    assert not torch.equal(
        full.last_hidden_state, backbone.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    )


@pytest.mark.parametrize("method", ["genarm", "parm"])
def test_training_lowers_the_arm_loss_and_the_saved_adapters_round_trip(backbone, tokenizer, small_data, tmp_path, method):
    config = train_config(small_data, tmp_path, method)
    arm_config = config.arm_config(backbone, tokenizer)
    features = DualHeadModel(backbone, tokenizer, DualHeadConfig(backbone=backbone.name_or_path, gate_size=16, gate_heads=2))
    data = prepare_arm_data(config, features, arm_config.first_layer, progress=False)
    fixed = [collate_pairs(data.cache, data.train[name], np.arange(8)) for name in arm_config.objectives]
    preference = torch.tensor([0.5, 0.5]) if method == "parm" else None
    torch.manual_seed(config.seed)
    fresh = new_arm(backbone, arm_config)  # what the run starts from
    with torch.no_grad():
        before, _ = arm_training_loss(fresh, arm_config, fixed, preference)

    trained, saved_config = train_arm(config, backbone, tokenizer, progress=False)
    with torch.no_grad():
        after, _ = arm_training_loss(trained, arm_config, fixed, preference)
    assert after < before - 0.05
    assert all(not p.requires_grad for name, p in trained.named_parameters() if ".lora_" not in name)
    log = [json.loads(line) for line in (Path(config.output_dir) / "training_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == list(range(1, 21))
    assert "helpfulness/rewards/chosen" in log[0] and "helpfulness/rewards/accuracies" in log[0]
    suffix = "" if method == "genarm" else "@1,0"
    assert f"val/helpfulness/accuracy{suffix}" in saved_config.training
    card = (Path(config.output_dir) / "README.md").read_text()
    assert card.startswith(f"# {method} ARM") and f"helpfulness/accuracy{suffix}: " in card and "More Information Needed" not in card

    loaded, loaded_config = load_arm(config.output_dir, backbone, tokenizer, method, config.objective)
    assert loaded_config.layers == 1 and loaded_config.objectives == arm_config.objectives
    input_ids = torch.randint(5, 300, (3, 7))
    attention_mask = torch.ones_like(input_ids)
    for model in (trained, loaded):
        if method == "parm":
            bind_preference(model, torch.tensor([0.3, 0.7]))
    with torch.no_grad():
        assert torch.equal(full_logits(trained, input_ids, attention_mask), full_logits(loaded, input_ids, attention_mask))


def test_a_resumed_arm_run_ends_where_an_uninterrupted_one_does(backbone, tokenizer, small_data, tmp_path, monkeypatch):
    whole, _ = train_arm(
        train_config(small_data, tmp_path / "whole", "parm", steps=6, checkpoint_every=3), backbone, tokenizer, progress=False
    )
    real_loss, calls = arm_training.arm_training_loss, []

    def interrupted_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # after the checkpoint at step 3 and the log line of step 4
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    broken = train_config(small_data, tmp_path / "broken", "parm", steps=6, checkpoint_every=3)
    monkeypatch.setattr(arm_training, "arm_training_loss", interrupted_loss)
    with pytest.raises(KeyboardInterrupt):
        train_arm(broken, backbone, tokenizer, progress=False)
    monkeypatch.setattr(arm_training, "arm_training_loss", real_loss)
    # The interrupted run's directory moves (a clone elsewhere, a renamed folder): it still resumes.
    moved = tmp_path / "moved" / "arm"
    moved.parent.mkdir()
    Path(broken.output_dir).rename(moved)
    broken = train_config(small_data, tmp_path / "broken", "parm", steps=6, checkpoint_every=3, output_dir=str(moved))
    resumed, _ = train_arm(broken, backbone, tokenizer, progress=False)
    for name, parameter in adapter_parameters(whole).items():
        torch.testing.assert_close(adapter_parameters(resumed)[name], parameter)
    log = [json.loads(line)["step"] for line in (Path(broken.output_dir) / "training_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------- decoding


def test_genarm_scores_are_the_base_plus_the_weighted_arm_logprobs(make_model, baseline_checkpoints):
    model = make_model()
    decoder = build_decoder("genarm", model, strength=2.0)  # 1 / beta = 2
    arms = [
        load_arm(baseline_checkpoints / f"genarm-{name}", model.backbone, model.tokenizer, "genarm", name)[0]
        for name in OBJECTIVES
    ]
    _, input_ids, attention_mask, preference, _ = prepare_batch(model, ["Hi", "Tell me about bread."], [[0.3, 0.7], [1.0, 0.0]])

    def by_hand(ids, mask):
        scores = F.log_softmax(full_logits(model.backbone, ids, mask), -1)
        for index, arm in enumerate(arms):
            scores = scores + 2.0 * preference[:, index, None] * F.log_softmax(full_logits(arm, ids, mask), -1)
        return scores

    with torch.no_grad():
        first = decoder.start(input_ids, attention_mask, preference).logits
        torch.testing.assert_close(first, by_hand(input_ids, attention_mask))
        tokens = first.argmax(-1)[:, None]  # (B, 1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(tokens)], dim=1)
        second = decoder.step(tokens, attention_mask).logits  # each ARM continues from its own cache
        torch.testing.assert_close(second, by_hand(torch.cat([input_ids, tokens], dim=1), attention_mask))
        assert not torch.allclose(first, F.log_softmax(full_logits(model.backbone, input_ids, attention_mask[:, :-1]), -1))
    assert decoder.model_passes_per_token == 3
    assert decoder.trainable_parameters() == sum(p.numel() for arm in arms for p in adapter_parameters(arm).values()) > 0


def test_genarm_over_reward_heads_reads_each_head_at_its_objective_on_one_backbone_pass(make_model, tmp_path):
    """GenARM on the Dual-Head's terms: one reward head per objective on the shared backbone, each read at its
    objective's one-hot, fused as GenARM does and restricted to the base model's top-k."""
    model = make_model(randomize=False)
    heads = []
    for seed, name in enumerate(OBJECTIVES):
        torch.manual_seed(seed + 1)
        head = make_model(reward_head="hidden", reward_context="prompt-product", guidance_top_k=5)
        head.save_pretrained(tmp_path / name)
        heads.append(head)
    (tmp_path / "harmlessness" / "train_config.json").write_text(json.dumps({"train_objective": "harmlessness"}))
    decoder = build_decoder("genarm", model, strength=2.0, checkpoint=str(tmp_path / "{objective}"))
    assert decoder.guidance_top_k == 5 and decoder.model_passes_per_token == 1 and decoder.trainable_parameters() > 0
    _, input_ids, attention_mask, preference, _ = prepare_batch(model, ["Hi", "Tell me about bread."], [[0.3, 0.7], [1.0, 0.0]])

    def by_hand(ids, mask):
        base = None
        scores = 0.0
        for index, head in enumerate(heads):
            one_hot = torch.eye(2)[index].expand(ids.shape[0], -1)
            prompt_mask = torch.zeros_like(mask)
            prompt_mask[:, : input_ids.shape[1]] = mask[:, : input_ids.shape[1]]  # the context is the prompt's
            out = head(ids, mask, one_hot, prompt_mask=prompt_mask)
            base = out.lm_logits[:, -1]
            scores = scores + 2.0 * preference[:, index, None] * F.log_softmax(out.reward_logits[:, -1], -1)
        fused = F.log_softmax(base, -1) + scores
        keep = base.topk(5, -1).indices
        return torch.full_like(fused, float("-inf")).scatter(-1, keep, fused.gather(-1, keep))

    def same_choice(scores, expected):  # equal up to a per-row constant: the same distribution over the kept tokens
        torch.testing.assert_close(scores.log_softmax(-1), expected.log_softmax(-1))

    with torch.no_grad():
        first = decoder.start(input_ids, attention_mask, preference).logits
        same_choice(first, by_hand(input_ids, attention_mask))
        assert (first > float("-inf")).sum(-1).tolist() == [5, 5]
        tokens = first.argmax(-1)[:, None]
        attention_mask = torch.cat([attention_mask, torch.ones_like(tokens)], dim=1)
        second = decoder.step(tokens, attention_mask).logits  # continues from the shared cache
        same_choice(second, by_hand(torch.cat([input_ids, tokens], dim=1), attention_mask))
        # over the whole vocabulary (no top-k) the heads are read out in full and the scores are GenARM's exactly
        whole = build_decoder("genarm", model, strength=2.0, guidance_top_k=0, checkpoint=str(tmp_path / "{objective}"))
        full = whole.start(input_ids[:1], attention_mask[:1, : input_ids.shape[1]], preference[:1]).logits
        assert not whole.read_out_top_k and decoder.read_out_top_k
        restricted = full.gather(-1, first[:1].topk(5, -1).indices)
        torch.testing.assert_close(restricted.log_softmax(-1), first[:1].topk(5, -1).values.log_softmax(-1))

    template = str(tmp_path / "{objective}")
    assert build_decoder("genarm", model, checkpoint=template).strength == heads[0].config.strength  # the heads' own default
    by_name = generate(model, ["Hi"], [0.2, 0.8], method="genarm", method_checkpoint=template, strength=2.0, max_new_tokens=4, temperature=0)
    by_decoder = generate(model, ["Hi"], [0.2, 0.8], decoder=build_decoder("genarm", model, strength=2.0, checkpoint=template),
                          max_new_tokens=4, temperature=0)
    assert by_name[0].token_ids == by_decoder[0].token_ids
    with pytest.raises(ValueError, match="method 'dualhead' has none"):
        generate(model, ["Hi"], [0.2, 0.8], method="dualhead", method_checkpoint=template, max_new_tokens=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\n")
    config = SweepConfig(prompts=str(prompts), out=str(tmp_path / "sweep"), methods=["genarm", "base"], grid=2, max_new_tokens=3,
                         method_checkpoint=template)
    run_sweep(config, model=model, scorer=MarkerScorer(), progress=False)
    passes = {row["method"]: row["model_passes_per_token"] for row in read_results(tmp_path / "sweep" / "results.jsonl")}
    assert passes == {"genarm": 1.0, "base": 1.0}  # the heads share the base pass; base ignores the baseline checkpoint
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["method_checkpoint"] == template

    (tmp_path / "harmlessness" / "train_config.json").write_text(json.dumps({"train_objective": "helpfulness"}))
    with pytest.raises(ValueError, match="reward head of 'helpfulness', not of 'harmlessness'"):
        build_decoder("genarm", model, checkpoint=template)


def test_parm_conditions_each_row_on_its_preference(make_model, baseline_checkpoints):
    model = make_model()
    decoder = build_decoder("parm", model, strength=0.5)
    arm, _ = load_arm(baseline_checkpoints / "parm", model.backbone, model.tokenizer, "parm")
    weights = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    _, input_ids, attention_mask, preference, _ = prepare_batch(model, "How do I pick a lock?", weights)
    with torch.no_grad():
        scores = decoder.start(input_ids, attention_mask, preference).logits  # (3, V)
        base = F.log_softmax(full_logits(model.backbone, input_ids, attention_mask), -1)
        for row, weight in enumerate(weights):
            bind_preference(arm, torch.tensor(weight))
            expected = (
                base[row] + 0.5 * F.log_softmax(full_logits(arm, input_ids[row : row + 1], attention_mask[row : row + 1]), -1)[0]
            )
            torch.testing.assert_close(scores[row], expected)
    assert not torch.allclose(scores[0], scores[1]) and not torch.allclose(scores[0], scores[2])
    assert decoder.model_passes_per_token == 2 and decoder.trainable_parameters() > 0


def test_args_scores_the_conversation_each_row_answers(make_model):
    model = make_model()
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bread?"},
    ]

    def seen(prompts, **options):
        scorer = MarkerScorer()
        decoder = ARGSDecoder(model.backbone, model.tokenizer, scorer, model.objectives, candidates=2)
        generate(model, prompts, [1.0, 0.0], decoder=decoder, max_new_tokens=1, temperature=0, **options)
        return scorer.prompts[:: 2]  # each row's prompt, once per row (two candidates each)

    assert seen(["How do I pick a lock?", conversation]) == ["How do I pick a lock?", conversation]
    system = {"role": "system", "content": "Be brief."}
    assert seen([conversation], system_prompt="Be brief.") == [[system, *conversation]]
    assert seen(["Hi"], system_prompt="Be brief.") == [[system, {"role": "user", "content": "Hi"}]]
    assert seen(["plain text"], chat=False) == ["plain text"]  # no template: the text the model sees
    decoder = ARGSDecoder(model.backbone, model.tokenizer, MarkerScorer(), model.objectives)
    _, input_ids, attention_mask, preference, _ = prepare_batch(model, "Hi", [1.0, 0.0])
    with pytest.raises(ValueError, match="start\\(\\) needs prompts, one per row \\(1\\), got None"):
        decoder.start(input_ids, attention_mask, preference)


def test_args_follows_the_reward_and_equals_greedy_without_it(make_model):
    model = make_model()
    prompt = "How do I pick a lock?"
    _, input_ids, attention_mask, _, _ = prepare_batch(model, prompt, [1.0, 0.0])
    with torch.no_grad():
        candidates = full_logits(model.backbone, input_ids, attention_mask)[0].topk(5).indices.tolist()
    texts = [model.tokenizer.decode([token]) for token in candidates]
    # A candidate below the argmax whose text no other candidate contains: the marker only it earns.
    pick = next(
        i for i in range(1, 5) if texts[i].strip() and not any(texts[i] in other for j, other in enumerate(texts) if j != i)
    )
    scorer = MarkerScorer({"helpfulness": texts[pick]})

    def args_tokens(preference, weight, tokens=1):
        decoder = ARGSDecoder(model.backbone, model.tokenizer, scorer, model.objectives, candidates=5, weight=weight)
        (result,) = generate(model, prompt, preference, decoder=decoder, max_new_tokens=tokens, temperature=0)
        return result.token_ids

    assert args_tokens([1.0, 0.0], weight=100.0) == [candidates[pick]]
    assert scorer.prompts and set(scorer.prompts) == {prompt}  # the scorer reads the prompt as given, not the template
    assert args_tokens([0.0, 1.0], weight=100.0) == [candidates[0]]  # the preference puts no weight on the marker
    (greedy,) = generate(model, prompt, [1.0, 0.0], method="base", max_new_tokens=6, temperature=0)
    assert args_tokens([1.0, 0.0], weight=0.0, tokens=6) == greedy.token_ids
    (sampled,) = generate(
        model,
        prompt,
        [0.5, 0.5],
        decoder=ARGSDecoder(model.backbone, model.tokenizer, scorer, model.objectives, 3, 1.0),
        max_new_tokens=4,
        temperature=1.0,
        seed=3,
    )
    assert len(sampled.token_ids) <= 4


def test_the_unconditioned_dual_head_ignores_the_preference(backbone, tokenizer, baseline_checkpoints):
    heads = UnconditionedDualHeadModel.from_pretrained(baseline_checkpoints / "dualhead-unconditioned", backbone, tokenizer)
    input_ids = torch.randint(5, 300, (1, 6))
    with torch.no_grad():
        one, other = heads(input_ids, preference=[1.0, 0.0]), heads(input_ids, preference=[0.2, 0.8])
        plain = backbone(input_ids).logits
    assert torch.equal(one.logits, other.logits) and torch.equal(one.gate, other.gate)
    assert not torch.allclose(one.logits, plain)
    conditioned = DualHeadModel(
        backbone, tokenizer, DualHeadConfig(backbone=backbone.name_or_path, reward_head="lora", gate_size=16, gate_heads=2)
    )
    conditioned.save_pretrained(baseline_checkpoints.parent / "conditioned")
    with pytest.raises(ValueError, match="preference-conditioned gate"):
        UnconditionedDualHeadModel.from_pretrained(baseline_checkpoints.parent / "conditioned", backbone, tokenizer)


@pytest.mark.parametrize(
    "method, command",
    [
        ("genarm", "paretoalign train-arm --method genarm --objective helpfulness --out {root}/genarm-helpfulness"),
        ("parm", "paretoalign train-arm --method parm --out {root}/parm"),
        ("dualhead-unconditioned", "paretoalign train-arm --method dualhead-unconditioned --out {root}/dualhead-unconditioned"),
    ],
)
def test_a_missing_checkpoint_names_its_path_and_the_command_that_makes_it(make_model, tmp_path, monkeypatch, method, command):
    monkeypatch.setenv("PARETOALIGN_BASELINE_CHECKPOINTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is missing") as error:
        build_decoder(method, make_model())
    assert command.format(root=tmp_path) in str(error.value)


def test_every_registered_method_runs_through_the_sweep(make_model, baseline_checkpoints, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do I pick a lock?\nTell me about bread.\n")
    names = sorted(METHODS)
    assert {"genarm", "parm", "args", "dualhead-unconditioned"} <= set(names)
    config = SweepConfig(prompts=str(prompts), out=str(tmp_path / "sweep"), methods=names, grid=2, max_new_tokens=3, batch_size=4)
    result = run_sweep(config, model=make_model(), scorer=MarkerScorer(), progress=False)
    assert result["written"] == sum(2 * (2 if METHODS[name].uses_preference else 1) for name in names)
    rows = read_results(tmp_path / "sweep" / "results.jsonl")
    passes = {row["method"]: row["model_passes_per_token"] for row in rows}
    args_passes = passes.pop("args")
    assert passes == {"dualhead": 1.0, "base": 1.0, "genarm": 3.0, "parm": 2.0, "dualhead-unconditioned": 1.0}
    assert args_passes > 1.0  # one backbone pass plus the scorer's batched passes over the candidates
    assert all(row["preference"] is None for row in rows if row["method"] == "dualhead-unconditioned")
    trained = {run["method"]: run["trainable_parameters"] for run in read_results(tmp_path / "sweep" / "methods.jsonl")}
    assert trained["genarm"] > 0 and trained["parm"] > 0 and trained["dualhead-unconditioned"] > 0 and trained["args"] == 0


def test_cli_trains_checkpoints_that_the_methods_load(make_model, backbone, tokenizer, small_data, tmp_path, capsys):
    backbone_dir = tmp_path / "tiny-backbone"
    backbone.save_pretrained(backbone_dir)
    tokenizer.save_pretrained(backbone_dir)
    data = ["--backbone", str(backbone_dir), "--data-dir", str(small_data), "--steps", "2", "--no-progress"]
    common = [*data, "--feature-cache", str(tmp_path / "features"), "--batch-pairs", "2", "--max-train-pairs", "4"]
    assert main(["train-arm", "--method", "parm", "--layers", "1", "--out", str(tmp_path / "parm"), *common]) == 0
    assert f"saved the parm ARM to {tmp_path / 'parm'}" in capsys.readouterr().out
    config = json.loads((tmp_path / "parm" / "arm_config.json").read_text())
    assert config["layers"] == 1 and config["objectives"] == OBJECTIVES and config["training"]["steps"] == 2
    model = make_model()  # the same backbone weights, loaded in memory
    assert build_decoder("parm", model, checkpoint=tmp_path / "parm").trainable_parameters() > 0

    out = tmp_path / "unconditioned"
    assert main(["train-arm", "--method", "dualhead-unconditioned", "--out", str(out), *common]) == 0
    assert (out / "run" / "training_log.jsonl").is_file()
    (result,) = generate(
        model, "Hi", [0.5, 0.5], decoder=build_decoder("dualhead-unconditioned", model, checkpoint=out), max_new_tokens=3
    )
    assert len(result.gate) == len(result.token_ids) <= 3

    for argv, message in [
        (["--method", "genarm", "--out", str(tmp_path / "one-dir")], "must hold '{objective}'"),
        (["--method", "parm", "--objective", "helpfulness"], "--objective applies to genarm only"),
        (["--method", "dualhead-unconditioned", "--layers", "2"], "--layers and --objective apply to genarm and parm only"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["train-arm", *argv, *common])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_unconditioned_decoder_takes_the_callers_guidance_settings(make_model, baseline_checkpoints):
    from paretoalign.baselines.unconditioned import build_decoder

    model = make_model()
    directory = baseline_checkpoints / "dualhead-unconditioned"
    own = build_decoder(model, checkpoint=directory)
    assert own.guidance_top_k == UnconditionedDualHeadModel.from_pretrained(directory, model.backbone, model.tokenizer).config.guidance_top_k
    steered = build_decoder(model, checkpoint=directory, guidance_top_k=7, strength=2.5)
    assert steered.guidance_top_k == 7 and steered.strength == 2.5


def test_arm_and_dual_head_runs_on_the_same_settings_draw_the_same_pairs(tokenizer, small_data, tmp_path):
    from paretoalign.train import TrainConfig

    arm = train_config(small_data, tmp_path, "parm", max_train_pairs=10, seed=3)
    shared = {name: getattr(arm, name) for name in ("data_dir", "max_train_pairs", "max_eval_pairs", "max_length", "max_prompt_length", "seed")}
    dual = TrainConfig(output_dir=str(tmp_path / "dual"), **shared)
    arm_pairs, dual_pairs = arm.pair_sequences(tokenizer), dual.pair_sequences(tokenizer)
    assert arm_pairs.sequences == dual_pairs.sequences and len(arm_pairs.sequences) == 2 * 2 * (10 + 4)
    for split in ("train", "validation"):
        for name in OBJECTIVES:
            assert [p.prompt for p in arm_pairs.pairs[split][name]] == [p.prompt for p in dual_pairs.pairs[split][name]]
            assert np.array_equal(arm_pairs.index[split][name].chosen, dual_pairs.index[split][name].chosen)
    # the Dual-Head's own per-objective limit draws fewer of the same seeded permutation; nothing else changes
    fewer = TrainConfig(output_dir=str(tmp_path / "fewer"), max_train_pairs_by_objective={"helpfulness": 6}, **shared)
    drawn = fewer.pair_sequences(tokenizer)
    assert len(drawn.pairs["train"]["helpfulness"]) == 6 and len(drawn.pairs["train"]["harmlessness"]) == 10
    assert {p.chosen for p in drawn.pairs["train"]["helpfulness"]} < {p.chosen for p in dual_pairs.pairs["train"]["helpfulness"]}
    assert [p.prompt for p in drawn.pairs["validation"]["harmlessness"]] == [p.prompt for p in dual_pairs.pairs["validation"]["harmlessness"]]


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0, got -1"),
        ({"max_grad_norm": 0}, "max_grad_norm must be > 0, got 0"),
        ({"max_train_pairs": 0}, "max_train_pairs must be a positive integer or null, got 0"),
        ({"eval_every": True}, "eval_every must be a positive integer, got True"),
    ],
)
def test_both_trainers_check_their_shared_settings_alike(small_data, tmp_path, setting, message):
    from paretoalign.train import TrainConfig

    with pytest.raises(ValueError, match=message):
        train_config(small_data, tmp_path, "parm", **setting)
    with pytest.raises(ValueError, match=message):
        TrainConfig(output_dir=str(tmp_path / "dual"), **setting)
