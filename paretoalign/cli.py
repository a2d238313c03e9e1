"""The ``paretoalign`` command line: ``paretoalign generate ...``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
from pathlib import Path

from .preference import DEFAULT_OBJECTIVES, parse_objectives, parse_preference, reorder_preference


def _add_generate(subparsers) -> None:
    from .generation import GenerateConfig

    parser = _add_config_command(
        subparsers, "generate", GenerateConfig, run_generate, "answer a prompt steered by a preference over objectives", progress=False
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object: text, preference, tokens, gate")
    output.add_argument("--stream", action="store_true", help="print the answer as it is generated")


def run_generate(args: argparse.Namespace) -> int:
    from .generation import generate, stream_generate

    config = _config(args)  # checks the prompt, method and preference before the model loads
    objectives = parse_objectives(config.objectives)
    weights = parse_preference(config.preference, objectives)
    model = config.load_model(config.dtype)
    preference = reorder_preference(weights, objectives, model.objectives)
    by_name = dict(zip(objectives, weights))
    options = {"method": config.method, **config.sampling()}
    if args.stream:
        printed = ""
        for (partial,) in stream_generate(model, config.prompt, preference, **options):
            if partial.text.startswith(printed):
                sys.stdout.write(partial.text[len(printed) :])
                sys.stdout.flush()
                printed = partial.text
        sys.stdout.write("\n")
        return 0
    (result,) = generate(model, config.prompt, preference, **options)
    if args.json:
        payload = {
            "text": result.text,
            "preference": {name: by_name[name] for name in objectives},
            "tokens": result.tokens,
            "token_ids": result.token_ids,
            "gate": result.gate,
            "finish_reason": result.finish_reason,
            "method": config.method,
            "backbone": model.config.backbone,
        }
        print(json.dumps(payload, ensure_ascii=False))
    else:
        print(result.text)
    return 0


def _dataclass_parser(config_class) -> argparse.ArgumentParser:
    """``HfArgumentParser`` over ``config_class`` without help, its ``--no_X`` switches (made for fields that default
    to ``True``) saying what they turn off instead of repeating the field's help."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(config_class, add_help=False)
    for action in parser._actions:
        if isinstance(action, argparse._StoreFalseAction) and action.option_strings[0].startswith("--no_"):
            action.help = f"turn it off ({action.dest} = False)"
    return parser


def _override_options(config_class, names: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """A parent parser with one option per plain field of ``config_class`` (names, types and help from the fields),
    or per field in ``names``.

    Fields holding mappings, tuples or nested settings are left to the config file. An option left off the command
    line sets nothing (its default is ``argparse.SUPPRESS``), so only what a user types overrides the file.
    """
    import typing

    plain = (str, int, float, bool)

    def is_plain(kind) -> bool:
        args = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if kind in plain:
            return True
        if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
            return args[0] in plain
        return typing.get_origin(kind) is list and args == [str]

    hints = typing.get_type_hints(config_class)
    options = [
        (f.name, hints[f.name], dataclasses.field(default=None if f.default is dataclasses.MISSING else f.default, metadata=f.metadata))
        for f in dataclasses.fields(config_class)
        if is_plain(hints[f.name]) and (names is None or f.name in names)
    ]
    parser = _dataclass_parser(dataclasses.make_dataclass(f"{config_class.__name__}Options", options))
    for action in parser._actions:
        action.default, action.required = argparse.SUPPRESS, False
    parser.set_defaults(override_names=[name for name, _, _ in options])
    return parser


def _add_train(subparsers) -> None:
    from .train import TrainConfig

    parser = subparsers.add_parser(
        "train",
        parents=[_override_options(TrainConfig)],
        help="train the preference-aware heads (resumes an interrupted run)",
        description="Train from a JSON config; every option below overrides that field of the file. A candidate_tokens "
        "of 0 trains on the whole vocabulary.",
    )
    parser.add_argument("--config", default=None, help="JSON train config (default: configs/default.json)")
    parser.add_argument(
        "--reward-layers", type=int, default=None, help="model.reward_layers: the reward head re-runs the backbone's last k blocks (0: none)"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .train import DEFAULT_TRAIN_CONFIG, TrainConfig, train

    overrides = {name: getattr(args, name) for name in args.override_names if hasattr(args, name)}
    whole_vocabulary = overrides.get("candidate_tokens") == 0
    if whole_vocabulary:
        del overrides["candidate_tokens"]
    if args.reward_layers is not None:
        overrides["model"] = {"reward_layers": args.reward_layers}
    config = TrainConfig.from_json(args.config or DEFAULT_TRAIN_CONFIG, **overrides)
    if whole_vocabulary:  # None overrides keep the file's value, so "the whole vocabulary" is set here
        config = dataclasses.replace(config, candidate_tokens=None)
    train(config, progress=not args.no_progress)
    print(f"saved the trained heads to {config.output_dir}/model")
    return 0


def _add_arm_accuracy(subparsers) -> None:
    from .export import PairAccuracyConfig

    parser = _add_config_command(
        subparsers, "arm-accuracy", PairAccuracyConfig, run_arm_accuracy,
        "how often the reward head prefers the chosen reply of some pairs", progress=False,
    )
    parser.add_argument("--json", action="store_true", help="print {accuracy, n, mean_margin} (with --against: and against: {...}) as JSON")


def run_arm_accuracy(args: argparse.Namespace) -> int:
    from .export import measure_pair_accuracy

    result = measure_pair_accuracy(_config(args), progress=not args.json)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"accuracy {result['accuracy']:.4f} over {result['n']} pairs (mean margin {result['mean_margin']:.3f})")
    if "against" in result:
        gap = result["against"]
        se = "" if gap["paired_se"] is None else f" ± {gap['paired_se']:.4f} (paired SE)"
        print(f"at --against {gap['preference']}: accuracy {gap['accuracy']:.4f}; difference {gap['difference']:+.4f}{se}")
    return 0


def _add_export(subparsers) -> None:
    from .export import ExportConfig

    _add_config_command(subparsers, "export", ExportConfig, run_export, "ship a finished run: weights, log, test accuracy and a model card")


def run_export(args: argparse.Namespace) -> int:
    results = _config(args).export(progress=not args.no_progress)
    print(json.dumps(results, indent=2))
    return 0


def _add_config_command(subparsers, name: str, config_class, handler, help: str, progress: bool = True) -> argparse.ArgumentParser:
    """A subcommand whose options are the fields of a config dataclass (names, types, defaults and help from it)."""
    parser = subparsers.add_parser(name, parents=[_dataclass_parser(config_class)], help=help)
    if progress:
        parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=handler, config_class=config_class)
    return parser


def _config(args: argparse.Namespace):
    """The config dataclass a subcommand made by :func:`_add_config_command` parsed (validated by the class)."""
    return args.config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args.config_class)})


def _add_sweep(subparsers) -> None:
    from .evaluation.sweep import SweepConfig

    _add_config_command(
        subparsers, "sweep", SweepConfig, run_sweep_command, "generate and score every method over a preference grid (resumable)"
    )


def run_sweep_command(args: argparse.Namespace) -> int:
    from .evaluation.sweep import run_sweep

    result = run_sweep(_config(args), progress=not args.no_progress)
    print(f"{result['written']} rows written, {result['skipped']} already done, {result['total']} in the sweep: {result['directory']}")
    return 0


def _add_report(subparsers) -> None:
    from .evaluation.report import ReportConfig

    parser = _add_config_command(
        subparsers, "report", ReportConfig, run_report, "HV, MIP, speed and a Pareto-front figure from a sweep directory", progress=False
    )
    parser.add_argument("--json", action="store_true", help="print {methods: {name: {hv, mip, tokens_per_s, ...}}, ...} as JSON")


def run_report(args: argparse.Namespace) -> int:
    from .evaluation.report import json_summary

    config = _config(args)
    summary = config.write()
    if args.json:
        print(json.dumps(json_summary(summary), ensure_ascii=False))
        return 0
    for name, method in summary["methods"].items():
        hv, mip = (f"{v:.4f}" if v is not None else "n/a" for v in (method["hv"], method["mip"]))
        print(f"{name}: HV {hv}, MIP {mip}, {method['n_points']} points, {method['n_prompts']} prompts")
    written = [name for name in summary["files"].values() if name]
    print(f"wrote {', '.join(written)} to {config.out or config.results[0]}")
    return 0


def _add_train_scorer(subparsers) -> None:
    from .scorers.training import ScorerTrainConfig

    _add_config_command(
        subparsers, "train-scorer", ScorerTrainConfig, run_train_scorer,
        "train the offline MiniLM reward scorer (reproduces checkpoints/reward-minilm)",
    )


def run_train_scorer(args: argparse.Namespace) -> int:
    from .scorers.training import train_scorer

    config = _config(args)
    summary = train_scorer(config, progress=not args.no_progress)
    for objective, result in summary["results"].items():
        test, validation = result["test"], result["validation"]
        print(f"{objective}: test accuracy {test['accuracy']:.4f} (n={test['n']}), validation {validation['accuracy']:.4f} (n={validation['n']})")
    print(f"saved the scorer to {config.output_dir} in {summary['wall_seconds']:.0f} s")
    return 0


def _run_options() -> tuple[str, ...]:
    """The settings train-arm passes to every method's run: the fields every trainer shares (``loop.RunSettings``, which
    ARMTrainConfig and the unconditioned Dual-Head's TrainConfig both extend), less the ones train-arm sets itself."""
    from .loop import RunSettings

    return tuple(f.name for f in dataclasses.fields(RunSettings) if f.name not in ("output_dir", "objectives"))


def _add_train_arm(subparsers) -> None:
    from .baselines.arm_training import ARMTrainConfig

    parser = subparsers.add_parser(
        "train-arm",
        parents=[_override_options(ARMTrainConfig, _run_options() + ("layers",))],
        help="train a reference method's weights: GenARM's ARMs, PARM's ARM, the unconditioned Dual-Head (resumable)",
        description="Every option left out keeps the method's own default (the unconditioned Dual-Head: configs/default.json's).",
    )
    parser.add_argument("--method", required=True, choices=["genarm", "parm", "dualhead-unconditioned"])
    parser.add_argument("--out", default=None, help="checkpoint directory (default: checkpoints/genarm-<objective>, "
                        "checkpoints/parm, checkpoints/dualhead-unconditioned); for several GenARM objectives a path holding {objective}")
    parser.add_argument("--objective", default=None, help="genarm: the objective(s) whose ARM to train, comma-separated (default: all)")
    parser.add_argument("--objectives", default=",".join(DEFAULT_OBJECTIVES), help="every objective, in preference order")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=run_train_arm)


def run_train_arm(args: argparse.Namespace) -> int:
    from .backbone import load_backbone
    from .baselines.arm import default_checkpoint

    objectives = list(parse_objectives(args.objectives))
    common = {name: getattr(args, name) for name in _run_options() if hasattr(args, name)}
    layers = getattr(args, "layers", None)
    if args.method == "dualhead-unconditioned":
        from .baselines.unconditioned import train_unconditioned
        from .train import DEFAULT_TRAIN_CONFIG, TrainConfig

        if layers is not None or args.objective is not None:
            raise ValueError("--layers and --objective apply to genarm and parm only")
        out = Path(args.out) if args.out else default_checkpoint(args.method)
        # The Dual-Head's own training settings, with the preference-unaware reward head; the run lives in out/run.
        overrides = {"output_dir": str(out / "run"), "objectives": objectives, "model": {"reward_head": "lora", "reward_context": "none"}, **common}
        config = TrainConfig.from_json(DEFAULT_TRAIN_CONFIG, **overrides)
        train_unconditioned(config, out, progress=not args.no_progress)
        print(f"saved the unconditioned Dual-Head heads to {out}")
        return 0

    from .baselines.arm_training import ARMTrainConfig, train_arm

    if layers is not None:
        common["layers"] = layers
    if args.method == "parm":
        if args.objective is not None:
            raise ValueError("--objective applies to genarm only: PARM's one ARM learns every objective")
        runs = [ARMTrainConfig(method="parm", output_dir=args.out, objectives=objectives, **common)]
    else:
        chosen = list(parse_objectives(args.objective)) if args.objective else objectives
        if args.out and len(chosen) > 1 and "{objective}" not in args.out:
            raise ValueError(f"--out {args.out!r} must hold '{{objective}}' to train the ARMs of several objectives {chosen}")
        runs = [
            ARMTrainConfig(
                method="genarm", objective=name, objectives=objectives, **common,
                output_dir=args.out.replace("{objective}", name) if args.out else None,
            )
            for name in chosen
        ]
    backbone, tokenizer = load_backbone(runs[0].backbone)  # once for every ARM
    for config in runs:
        _, arm_config = train_arm(config, backbone, tokenizer, progress=not args.no_progress)
        accuracy = ", ".join(f"{key} {value:.3f}" for key, value in arm_config.training.items() if key.startswith("val/"))
        print(f"saved the {config.method} ARM to {config.output_dir} ({accuracy})")
    return 0


def _add_steering(subparsers) -> None:
    from .evaluation.steering import SteeringPromptsConfig, SteeringReportConfig

    _add_config_command(
        subparsers, "steering-prompts", SteeringPromptsConfig, run_steering_prompts,
        "write harmful and benign prompt sets of a split (for two sweeps)", progress=False,
    )
    _add_config_command(
        subparsers, "steering-report", SteeringReportConfig, run_steering_report,
        "refusals, fluency and selective steering from a harmful and a benign sweep", progress=False,
    )


def _add_sample_replies(subparsers) -> None:
    from .onpolicy import SampleConfig

    _add_config_command(
        subparsers, "sample-replies", SampleConfig, run_sample_replies, "sample k base-model replies to each prompt, for teachers to label (resumable)"
    )


def run_sample_replies(args: argparse.Namespace) -> int:
    from .onpolicy import sample_replies

    result = sample_replies(_config(args), progress=not args.no_progress)
    print(f"{result['written']} prompts sampled, {result['skipped']} already done, {result['total']} in all: {result['directory']}")
    return 0


def run_steering_prompts(args: argparse.Namespace) -> int:
    for name, path in _config(args).write().items():
        print(f"{name}: {path}")
    return 0


def run_steering_report(args: argparse.Namespace) -> int:
    from .evaluation.steering import markdown_steering

    print(markdown_steering(_config(args).write()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paretoalign", description="Multi-objective test-time alignment with a preference-aware Dual-Head.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    _add_train(subparsers)
    _add_arm_accuracy(subparsers)
    _add_export(subparsers)
    _add_train_scorer(subparsers)
    _add_sweep(subparsers)
    _add_report(subparsers)
    _add_train_arm(subparsers)
    _add_steering(subparsers)
    _add_sample_replies(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"paretoalign {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
