"""The ``paretoalign generate`` command, run in-process on a tiny backbone saved to disk."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from paretoalign.cli import main


@pytest.fixture
def tiny_dir(backbone, tokenizer, tmp_path):
    directory = tmp_path / "tiny-backbone"
    backbone.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture
def tiny_checkpoint(make_model, tiny_dir, tmp_path):
    model = make_model()
    model.config.backbone = tiny_dir
    model.save_pretrained(tmp_path / "checkpoint")
    return str(tmp_path / "checkpoint")


def run_json(capsys, *argv):
    assert main(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_json_from_a_checkpoint(capsys, tiny_checkpoint):
    out = run_json(capsys, "--prompt", "How do I pick a lock?", "--preference", "0.2,0.8", "--checkpoint", tiny_checkpoint,
                   "--max-new-tokens", "6", "--temperature", "0")
    assert out["preference"] == {"helpfulness": 0.2, "harmlessness": 0.8}
    assert len(out["tokens"]) == len(out["gate"]) == len(out["token_ids"]) <= 6
    assert "".join(out["tokens"]) == out["text"]
    assert all(0.0 < a < 1.0 for a in out["gate"])


def test_objectives_order_is_respected(capsys, tiny_checkpoint):
    common = ["--prompt", "Hi", "--checkpoint", tiny_checkpoint, "--max-new-tokens", "5", "--temperature", "0"]
    swapped = run_json(capsys, *common, "--objectives", "harmlessness,helpfulness", "--preference", "0.8,0.2")
    plain = run_json(capsys, *common, "--preference", "0.2,0.8")
    assert swapped["preference"] == {"harmlessness": 0.8, "helpfulness": 0.2}
    assert swapped["gate"] == plain["gate"] and swapped["text"] == plain["text"]


def test_untrained_heads_on_a_backbone_path(capsys, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("paretoalign.model.DEFAULT_CHECKPOINT", tmp_path / "no-shipped-checkpoint")
    common = ["--prompt", "Hi", "--preference", "0,1", "--backbone", tiny_dir, "--max-new-tokens", "5", "--temperature", "0"]
    fused = run_json(capsys, *common)
    base = run_json(capsys, *common, "--method", "base")
    assert fused["token_ids"] == base["token_ids"]  # untrained heads reproduce the backbone
    assert len(fused["gate"]) == len(fused["tokens"]) and base["gate"] == []


def test_missing_checkpoint_from_the_environment(capsys, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PARETOALIGN_CHECKPOINT", str(tmp_path / "nothing-here"))
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "Hi", "--preference", "0,1", "--backbone", tiny_dir])
    assert "PARETOALIGN_CHECKPOINT" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preference", "0.5,0.6"], "must sum to 1"),
        (["--preference", "a,b"], "comma-separated numbers"),
        (["--preference", "1"], "1 weights but there are 2 objectives"),
        (["--preference", "0.5,0.5", "--objectives", "helpfulness,honesty"], "do not match the model's objectives"),
        (["--preference=-1,2"], "preference [-1.0, 2.0] must be non-negative"),
        (["--preference", "0.5,0.5", "--prompt", "  "], "--prompt: the prompt is empty"),
    ],
)
def test_bad_arguments_exit_with_a_message(capsys, tiny_checkpoint, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "Hi", "--checkpoint", tiny_checkpoint, *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["report", "--results", "a", "b"], "out is required when results names several sweeps"),
        (["report", "--results", "a", "b", "--out", "o", "--labels", "x"], "labels must name each of the 2 sweeps once"),
        (["report", "--results", "a", "--bootstrap", "-5"], "bootstrap must be 0 (no intervals) or a positive number of resamples, got -5"),
        (["steering-report", "--harmful", "h", "--benign", "b", "--out", "o", "--samples", "-1"], "samples must be 0 (none)"),
        (["steering-prompts", "--out", "o", "--split", "dev"], "split must be one of"),
        (["steering-prompts", "--out", "o", "--per-set", "0"], "per_set must be a positive integer, got 0"),
        (["export", "--run", "r", "--out", "o", "--max-pairs", "0"], "max_pairs must be a positive integer, got 0"),
    ],
)
def test_small_commands_refuse_bad_arguments_before_reading_or_writing(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_arm_accuracy_json(capsys, tiny_checkpoint, tmp_path):
    from paretoalign.data import DATA_DIR

    with gzip.open(DATA_DIR / "hh-rlhf" / "harmless-base.jsonl.gz", "rt") as source:
        lines = [next(source) for _ in range(6)]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(lines))
    argv = ["arm-accuracy", "--data", str(pairs_file), "--objective", "harmlessness", "--preference", "0,1",
            "--checkpoint", tiny_checkpoint, "--json"]
    assert main([*argv, "--no-feature-cache"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 6 and 0.0 <= out["accuracy"] <= 1.0
    assert out["accuracy"] * 6 == pytest.approx(round(out["accuracy"] * 6))
    # a file's pairs take its name as their source; --source keeps that source's first --max-pairs
    assert main([*argv, "--no-feature-cache", "--source", "pairs", "--max-pairs", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 4
    with pytest.raises(SystemExit):
        main([*argv, "--no-feature-cache", "--source", "pku-saferlhf"])
    assert "source 'pku-saferlhf' has none of these pairs; they come from ['pairs']" in capsys.readouterr().err
    # from a feature cache (built on the first call, read on the second): the same accuracy
    for _ in range(2):
        assert main([*argv, "--feature-cache", str(tmp_path / "features")]) == 0
        cached = json.loads(capsys.readouterr().out)
        assert cached["n"] == 6 and cached["accuracy"] == out["accuracy"]
        assert cached["mean_margin"] == pytest.approx(out["mean_margin"], abs=2e-3)
    assert len([meta for meta in (tmp_path / "features").glob("*/meta.json") if json.loads(meta.read_text())["complete"]]) == 1


def test_arm_accuracy_against_a_second_preference(capsys, tiny_checkpoint, tmp_path):
    from paretoalign.data import DATA_DIR, load_pairs
    from paretoalign.model import DualHeadModel
    from paretoalign.objective import pair_margins

    pairs_file = tmp_path / "pairs.jsonl"
    with gzip.open(DATA_DIR / "hh-rlhf" / "helpful-base.jsonl.gz", "rt") as source:
        pairs_file.write_text("".join(next(source) for _ in range(8)))
    argv = ["arm-accuracy", "--data", str(pairs_file), "--objective", "helpfulness", "--preference", "1,0",
            "--checkpoint", tiny_checkpoint, "--no-feature-cache"]
    assert main([*argv, "--against", "0,1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    first, second = pair_margins(DualHeadModel.from_pretrained(tiny_checkpoint), load_pairs(pairs_file, objective="helpfulness"), [[1.0, 0.0], [0.0, 1.0]])
    d = np.array([float(a > 0) - float(b > 0) for a, b in zip(first, second)])  # per pair: correct at (1,0) minus at (0,1)
    assert out["accuracy"] == pytest.approx(np.mean(np.array(first) > 0))
    against = out["against"]
    assert against["preference"] == "0,1" and against["accuracy"] == pytest.approx(np.mean(np.array(second) > 0))
    assert against["difference"] == pytest.approx(out["accuracy"] - against["accuracy"]) == pytest.approx(d.mean())
    assert against["paired_se"] == pytest.approx(d.std(ddof=1) / np.sqrt(8)) and against["n"] == 8
    assert main(argv + ["--against", "0,1"]) == 0
    assert "at --against 0,1: accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*argv, "--against", "0.7,0.7"])
    assert "--against '0.7,0.7'" in capsys.readouterr().err


def test_paired_accuracy_difference_by_hand():
    from paretoalign.objective import paired_accuracy_difference

    # correct at the first: 1, 1, 0, 1; at the second: 0, 1, 0, 0 -> d = 1, 0, 0, 1: mean 0.5, std(ddof=1) 0.5774
    found = paired_accuracy_difference([0.3, 0.1, -0.2, 2.0], [-0.1, 0.4, -0.5, -3.0])
    assert found["difference"] == pytest.approx(0.5) and found["n"] == 4
    assert found["paired_se"] == pytest.approx(np.std([1, 0, 0, 1], ddof=1) / 2)
    assert paired_accuracy_difference([1.0], [-1.0]) == {"difference": 1.0, "paired_se": None, "n": 1}
    with pytest.raises(ValueError, match="the same pairs on both sides, got 2 and 1"):
        paired_accuracy_difference([1.0, 2.0], [1.0])


def test_arm_accuracy_on_a_split_scores_the_sample_a_card_scores(capsys, tiny_checkpoint, tmp_path):
    """--split --max-pairs N scores the seeded sample export's card scores (not the split's first N)."""
    from paretoalign.export import held_out_pairs
    from paretoalign.model import DualHeadModel
    from paretoalign.objective import arm_accuracy

    argv = ["arm-accuracy", "--split", "test", "--objective", "helpfulness", "--preference", "1,0", "--max-pairs", "4",
            "--checkpoint", tiny_checkpoint, "--json", "--no-feature-cache"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    sample = held_out_pairs(["helpfulness"], "test", max_pairs=4)["helpfulness"]
    (expected,) = arm_accuracy(DualHeadModel.from_pretrained(tiny_checkpoint), sample, [[1.0, 0.0]])
    assert out["n"] == 4 and out["accuracy"] == expected["accuracy"]
    assert out["mean_margin"] == pytest.approx(expected["mean_margin"], abs=1e-5)
    with pytest.raises(SystemExit) as exit_info:
        main([*argv[:4], "honesty", *argv[5:]])
    assert exit_info.value.code == 2 and "--objective 'honesty' has no vendored pairs" in capsys.readouterr().err


def test_arm_accuracy_of_one_source_scores_the_cards_pairs_of_it(capsys, tiny_checkpoint):
    """--source keeps the sample's pairs of one data source: the pairs of the card's per-source row."""
    from paretoalign.export import held_out_pairs
    from paretoalign.model import DualHeadModel
    from paretoalign.objective import arm_accuracy

    argv = ["arm-accuracy", "--split", "test", "--objective", "harmlessness", "--preference", "0,1", "--max-pairs", "8",
            "--checkpoint", tiny_checkpoint, "--json", "--no-feature-cache"]
    assert main([*argv, "--source", "pku-saferlhf"]) == 0
    out = json.loads(capsys.readouterr().out)
    sample = held_out_pairs(["harmlessness"], "test", max_pairs=8)["harmlessness"]
    pku = [pair for pair in sample if pair.source == "pku-saferlhf"]
    assert 0 < len(pku) < len(sample)  # the sample mixes the two sources, so the filter is seen to act
    (expected,) = arm_accuracy(DualHeadModel.from_pretrained(tiny_checkpoint), pku, [[0.0, 1.0]])
    assert out["n"] == len(pku) and out["accuracy"] == expected["accuracy"]
    assert out["mean_margin"] == pytest.approx(expected["mean_margin"], abs=1e-5)
    for extra, message in [
        (["--source", "helpful-base"], "source 'helpful-base' has none of these pairs; they come from ['harmless-base', 'pku-saferlhf']"),
        (["--data", "pairs.jsonl"], "exactly one of data or split"),
        (["--feature-cache", "somewhere"], "feature_cache 'somewhere' and no_feature_cache exclude each other"),
        (["--max-pairs", "0"], "max_pairs must be a positive integer, got 0"),
        (["--batch-pairs", "0"], "batch_pairs must be a positive integer, got 0"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_arm_accuracy_truncates_pairs_as_the_checkpoint_was_trained(capsys, tiny_checkpoint, tmp_path):
    """A checkpoint's train_config.json (in it, as export ships it, or in the run folder holding it as model/) sets
    the lengths pairs are scored at, so arm-accuracy and the card agree; --max-length / --max-prompt-length override."""
    import shutil

    from paretoalign.data import DATA_DIR, load_pairs
    from paretoalign.model import DualHeadModel
    from paretoalign.objective import pair_margins

    pairs_file = tmp_path / "pairs.jsonl"
    with gzip.open(DATA_DIR / "hh-rlhf" / "helpful-base.jsonl.gz", "rt") as source:
        pairs_file.write_text("".join(next(source) for _ in range(6)))
    pairs = load_pairs(pairs_file, objective="helpfulness")
    model = DualHeadModel.from_pretrained(tiny_checkpoint)
    short, = pair_margins(model, pairs, [[1.0, 0.0]], max_length=48, max_prompt_length=24)
    full, = pair_margins(model, pairs, [[1.0, 0.0]])
    assert not np.allclose(short, full, atol=1e-4)  # the lengths matter on these pairs
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run / "model")
    (run / "train_config.json").write_text(json.dumps({"max_length": 48, "max_prompt_length": 24, "feature_dtype": "float32", "steps": 3}))
    argv = ["arm-accuracy", "--data", str(pairs_file), "--objective", "helpfulness", "--preference", "1,0", "--json", "--no-feature-cache"]
    assert main([*argv, "--checkpoint", str(run / "model")]) == 0  # a run's model/: the config beside it
    assert json.loads(capsys.readouterr().out)["mean_margin"] == pytest.approx(np.mean(short), abs=1e-5)
    shipped = tmp_path / "shipped"  # an exported checkpoint: the config in it
    shutil.copytree(tiny_checkpoint, shipped)
    shutil.copy2(run / "train_config.json", shipped / "train_config.json")
    assert main([*argv, "--checkpoint", str(shipped)]) == 0
    assert json.loads(capsys.readouterr().out)["mean_margin"] == pytest.approx(np.mean(short), abs=1e-5)
    assert main([*argv, "--checkpoint", str(shipped), "--max-length", "512", "--max-prompt-length", "384"]) == 0
    assert json.loads(capsys.readouterr().out)["mean_margin"] == pytest.approx(np.mean(full), abs=1e-5)
    with pytest.raises(SystemExit):
        main([*argv, "--checkpoint", str(shipped), "--max-length", "20"])
    assert "max_prompt_length=24, max_length=20" in capsys.readouterr().err


def test_arm_accuracy_names_the_bad_line(capsys, tiny_checkpoint, tmp_path):
    pairs_file = tmp_path / "broken.jsonl"
    good = json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."})
    pairs_file.write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["arm-accuracy", "--data", str(pairs_file), "--objective", "helpfulness", "--preference", "1,0",
              "--checkpoint", tiny_checkpoint])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "broken.jsonl" in error and "line 3" in error


def test_sample_replies_command(capsys, tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about bread {i}", "source": "helpful-base"}) + "\n" for i in range(3)))
    argv = ["sample-replies", "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--k", "2", "--max-new-tokens", "4",
            "--backbone", tiny_dir, "--no-progress"]
    assert main(argv) == 0
    assert "3 prompts sampled, 0 already done, 3 in all" in capsys.readouterr().out
    assert main(argv) == 0
    assert "0 prompts sampled, 3 already done" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*argv[:-1], "--k", "1"])
    assert "k must be at least 2 (pairs need two replies of a prompt), got 1" in capsys.readouterr().err


def test_generate_runs_every_registered_method(capsys, tiny_checkpoint, baseline_checkpoints):
    common = ["--prompt", "Hi", "--preference", "0.3,0.7", "--checkpoint", tiny_checkpoint, "--max-new-tokens", "4", "--temperature", "0"]
    for method in ("genarm", "parm", "args"):
        out = run_json(capsys, *common, "--method", method)
        assert out["method"] == method and out["token_ids"]
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *common, "--method", "beam"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "unknown method 'beam'" in error and "genarm" in error and "Traceback" not in error


def test_arm_accuracy_from_the_feature_cache_skips_the_backbone(make_model, tmp_path, monkeypatch):
    from paretoalign.data import PreferencePair
    from paretoalign.objective import arm_accuracy

    model = make_model()
    pairs = [PreferencePair([{"role": "user", "content": f"Question {i}?"}], f"A helpful answer {i}.", "No.", "helpfulness", "test") for i in range(5)]
    preferences = [[1.0, 0.0], [0.0, 1.0]]
    live = arm_accuracy(model, pairs, preferences, batch_pairs=2)
    first = arm_accuracy(model, pairs, preferences, batch_pairs=2, feature_cache=tmp_path)

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone ran although the pairs are cached")

    monkeypatch.setattr(model, "backbone_hidden", no_backbone)
    monkeypatch.setattr(model, "backbone_states", no_backbone)
    again = arm_accuracy(model, pairs, [[0.5, 0.5], *preferences], batch_pairs=3, feature_cache=tmp_path)
    for cached in (first, again[1:]):
        assert [r["accuracy"] for r in cached] == [r["accuracy"] for r in live]
        assert [r["mean_margin"] for r in cached] == pytest.approx([r["mean_margin"] for r in live], abs=2e-3)


def test_train_options_come_from_the_config_fields_and_override_only_what_is_typed(tmp_path, monkeypatch, capsys):
    import paretoalign.train as train_module

    seen = []
    monkeypatch.setattr(train_module, "train", lambda config, progress: seen.append(config))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"extends": str(Path(__file__).resolve().parents[1] / "configs" / "default.json"), "steps": 7, "learning_rate": 0.5}))
    argv = ["train", "--config", str(config), "--output-dir", str(tmp_path / "run"), "--no-progress"]
    folders = [f"data/onpolicy/{name}" for name in ("harmful", "benign", "harmful-declines", "benign-declines", "benign-more", "benign-more-declines", "extra")]
    assert main([*argv, "--steps", "3", "--no-include-pku", "--onpolicy", *folders, "--reward-layers", "2"]) == 0
    assert main([*argv, "--candidate_tokens", "0"]) == 0
    typed, untyped = seen
    assert (typed.steps, typed.learning_rate, typed.include_pku, typed.onpolicy) == (3, 0.5, False, folders)
    assert typed.model["reward_layers"] == 2 and typed.model["reward_head"] == "hidden"  # merged into the file's model settings
    assert (untyped.steps, untyped.include_pku, untyped.candidate_tokens, untyped.output_dir) == (7, True, None, str(tmp_path / "run"))
    assert untyped.onpolicy == train_module.TrainConfig.from_json(config).onpolicy  # the file's value, not a default
    for extra, message in [(["--steps", "many"], "--steps"), (["--feature-dtype", "float16"], "feature_dtype must be one of")]:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # the default recipe's rules name folders the override drops
        main([*argv, "--onpolicy", "a", "b"])
    assert exit_info.value.code == 2 and "onpolicy_rules[1] prefer and over must be folders of onpolicy" in capsys.readouterr().err


@pytest.mark.parametrize("command, switch, field", [("report", "--no-png", "png"), ("train", "--no-include-pku", "include_pku")])
def test_off_switches_say_what_they_turn_off(capsys, command, switch, field):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"{switch} turn it off ({field} = False)" in help_text
