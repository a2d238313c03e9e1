"""Damaged or foreign checkpoints and configs fail with one line naming the file, before anything large loads."""

import json
import shutil
from pathlib import Path

import pytest

from paretoalign.cli import main
from paretoalign.model import CONFIG_NAME, WEIGHTS_NAME, DualHeadModel

REPO = Path(__file__).resolve().parents[1]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00not a checkpoint\xff" * 20)


@pytest.fixture
def checkpoint(make_model, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "checkpoint")
    return tmp_path / "checkpoint"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: truncate(d / WEIGHTS_NAME), "is not a readable safetensors file"),
        (lambda d: garbage(d / WEIGHTS_NAME), "is not a readable safetensors file"),
        (lambda d: (d / WEIGHTS_NAME).unlink(), "does not exist"),
        (lambda d: truncate(d / CONFIG_NAME), "is not valid JSON"),
        (lambda d: garbage(d / CONFIG_NAME), "is not text"),
        (lambda d: (d / CONFIG_NAME).write_text("[1, 2]"), "must hold a JSON object, got list"),
        (lambda d: (d / CONFIG_NAME).write_text("{}"), "lacks ['backbone', 'objectives'"),
        (lambda d: (d / CONFIG_NAME).write_text(json.dumps({**json.loads((d / CONFIG_NAME).read_text()), "colour": 1})), "unknown DualHeadConfig fields ['colour']"),
        (lambda d: (d / CONFIG_NAME).write_text(json.dumps({**json.loads((d / CONFIG_NAME).read_text()), "gate_heads": 3})), "must be a positive multiple of gate_heads"),
    ],
)
def test_a_damaged_dualhead_checkpoint_fails_before_the_backbone_loads(checkpoint, damage, message, monkeypatch):
    damage(checkpoint)
    loads = []
    monkeypatch.setattr("paretoalign.model.load_backbone", lambda *a, **k: loads.append(1))
    with pytest.raises((ValueError, FileNotFoundError), match=None) as error:
        DualHeadModel.from_pretrained(checkpoint)
    assert message in str(error.value) and loads == []
    assert "\n" not in str(error.value)


def test_wrong_weights_are_named_with_the_tensor(checkpoint, backbone, tokenizer, make_model):
    from safetensors.torch import load_file, save_file

    tensors = load_file(checkpoint / WEIGHTS_NAME)
    name = sorted(tensors)[0]
    save_file({**tensors, name: tensors[name][..., :1].contiguous()}, checkpoint / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=f"{name} has shape"):
        DualHeadModel.from_pretrained(checkpoint, backbone, tokenizer)
    save_file({k: v for k, v in tensors.items() if k != name}, checkpoint / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="does not match this model: missing"):
        DualHeadModel.from_pretrained(checkpoint, backbone, tokenizer)


def test_the_cli_prints_one_line_and_exits_2(checkpoint, capsys):
    truncate(checkpoint / WEIGHTS_NAME)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "Hi", "--preference", "0.5,0.5", "--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is not a readable safetensors file" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["arm", "scorer"])
def test_damaged_arm_and_scorer_checkpoints_name_the_file(kind, baseline_root, backbone, tokenizer, tmp_path):
    if kind == "arm":
        from paretoalign.baselines.arm import CONFIG_NAME as ARM_CONFIG
        from paretoalign.baselines.arm import load_arm

        for method in ("parm", "genarm"):
            directory = tmp_path / method
            shutil.copytree(baseline_root / ("parm" if method == "parm" else "genarm-helpfulness"), directory)
            truncate(next(directory.glob("*.safetensors")))
            with pytest.raises(ValueError, match="ARM weights .* is not a readable safetensors file"):
                load_arm(directory, backbone, tokenizer, method)
            (directory / ARM_CONFIG).write_text("{broken")
            with pytest.raises(ValueError, match="ARM config .* is not valid JSON"):
                load_arm(directory, backbone, tokenizer, method)
    else:
        from paretoalign.scorers.rewards import MiniLMRewardScorer

        directory = tmp_path / "scorer"
        shutil.copytree(REPO / "checkpoints" / "reward-minilm", directory)
        weights = next(p for p in directory.glob("*.safetensors"))
        garbage(weights)
        with pytest.raises(ValueError, match="scorer weights .* is not a readable safetensors file"):
            MiniLMRewardScorer.from_pretrained(directory)
        config = next(p for p in directory.glob("*.json") if "config" in p.name)
        truncate(config)
        with pytest.raises(ValueError, match="scorer config .* is not valid JSON"):
            MiniLMRewardScorer.from_pretrained(directory)


def test_a_damaged_train_config_names_the_file(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text('{"steps": 3,')
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(config)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"train config {str(config)!r} is not valid JSON" in err


def cache_file_damages():
    """(file, damage) for the files of a feature cache; each leaves a cache that must not be read as complete."""

    def wrong_shape(path: Path) -> None:
        import numpy as np

        array = np.load(path)
        np.save(path, array[: max(1, len(array) - 2)])

    return [
        ("meta.json", garbage),
        ("hidden.npy", truncate),
        ("hidden.npy", garbage),
        ("tokens.npy", wrong_shape),
        ("offsets.npy", wrong_shape),
    ]


@pytest.mark.parametrize(("name", "damage"), cache_file_damages(), ids=lambda value: getattr(value, "__name__", value))
def test_a_damaged_feature_cache_names_the_file_and_neighbours_skip_it(name, damage, make_model, tmp_path):
    import numpy as np

    from paretoalign.candidates import CandidateCache, build_candidate_cache
    from paretoalign.features import FeatureCache, build_feature_cache

    model = make_model(randomize=False)
    sequences = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    cache = build_feature_cache(model, sequences, tmp_path, progress=False)
    candidates = build_candidate_cache(model.backbone.get_output_embeddings(), cache, np.array([2, 1, 3]), 4, progress=False)
    damage(cache.directory / name)
    with pytest.raises(ValueError, match=rf"{cache.directory.name}.*(damaged|not valid JSON|not text)"):
        FeatureCache.open(cache.directory)
    # another build that could reuse its sequences recomputes them instead, and says why
    again = build_feature_cache(model, [*sequences, [17, 18]], tmp_path, progress=False)
    assert json.loads((again.directory / "meta.json").read_text())["reused_sequences"] == 0
    truncate(candidates.directory / "ids.npy")
    with pytest.raises(ValueError, match=r"candidate cache file .*ids\.npy.* is damaged"):
        CandidateCache.open(candidates.directory)


@pytest.mark.parametrize(
    ("line", "message"),
    [(b"{not json\n", "not valid JSON"), (b"\xff\xfe\x00\n", "not UTF-8"), (b"[1, 2]\n", "not a row object")],
)
def test_a_damaged_sweep_line_names_the_file_and_the_line(line, message, tmp_path):
    from paretoalign.evaluation.sweep import read_results

    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"prompt_id": "a"}\n' + line + b'{"prompt_id": "b"}\n')
    with pytest.raises(ValueError, match=rf"results\.jsonl: line 2 .*{message}"):
        read_results(path)
