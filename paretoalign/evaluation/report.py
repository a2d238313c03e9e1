"""Reports of a preference sweep: per-method Pareto fronts, hypervolume and MIP, a markdown table and a plotly figure.

Every method is reduced to its mean reward per objective at each preference it was run with (with
standard errors over prompts). A method that ignores the preference (rows with ``"preference": null``)
has one point; for MIP that point stands at every grid point of the sweep. The normalisation bounds
come from the union of all methods' mean points (:func:`~paretoalign.evaluation.pareto.normalization_bounds`),
HV is measured in the normalised space from the origin (the lower bounds), MIP averages
``<w_j, normalised mean reward at w_j>``; both are recorded with the bounds in ``summary.json``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import atomic_write, check_positive_int, is_int, write_json
from .pareto import front_summary, normalization_bounds
from .sweep import METHOD_RUNS_NAME, RESULTS_NAME, SETTINGS_NAME, read_results, row_key

SUMMARY_NAME = "summary.json"
MARKDOWN_NAME = "report.md"
HTML_NAME = "pareto_front.html"
PNG_NAME = "pareto_front.png"
CONVENTION = (
    "rewards are maximised; each objective is min-max normalised over the union of all methods' mean points; "
    "HV is the hypervolume of a method's mean points in that space from the reference point (pymoo, on negated "
    "rewards); MIP is the mean over grid points of <preference, normalised mean reward>; a method that ignores "
    "the preference is one point, used at every grid point for MIP"
)


def load_sweep(directory: str | os.PathLike) -> tuple[dict, list[dict], list[dict]]:
    """``(settings, rows, method_runs)`` of a sweep directory; a row repeated in ``results.jsonl`` counts once."""
    directory = Path(directory).expanduser()
    settings_path = directory / SETTINGS_NAME
    if not settings_path.is_file():
        raise FileNotFoundError(f"{directory} is not a sweep directory: {SETTINGS_NAME} is missing")
    settings = json.loads(settings_path.read_text(encoding="utf-8"))
    unique: dict[tuple, dict] = {}
    for row in read_results(directory / RESULTS_NAME):
        unique.setdefault(row_key(row), row)
    return settings, list(unique.values()), read_results(directory / METHOD_RUNS_NAME)


def preference_points(rows: Sequence[dict], objectives: Sequence[str]) -> dict[str, list[dict]]:
    """Per method, one point per preference: ``{"preference", "n", "mean": {objective: ...}, "se": {...}}``.

    ``se`` is the standard error of the mean over prompts (``std(ddof=1) / sqrt(n)``), ``None`` when ``n == 1``.
    Points are ordered by preference; a method's single ``preference: None`` point stands alone.
    """
    groups: dict[str, dict[tuple | None, list[list[float]]]] = {}
    for row in rows:
        missing = [name for name in objectives if name not in row["scores"]]
        if missing:
            raise ValueError(f"row {row_key(row)} has no score for objectives {missing}")
        _, preference, _ = row_key(row)
        groups.setdefault(row["method"], {}).setdefault(preference, []).append([row["scores"][name] for name in objectives])
    points: dict[str, list[dict]] = {}
    for method, by_preference in groups.items():
        points[method] = []
        for preference in sorted(by_preference, key=lambda p: () if p is None else p):
            values = np.asarray(by_preference[preference], dtype=float)  # (n, k)
            n = len(values)
            mean = values.mean(axis=0)  # (k,)
            se = values.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else [None] * len(objectives)  # (k,)
            points[method].append(
                {
                    "preference": None if preference is None else list(preference),
                    "n": n,
                    "mean": {name: float(m) for name, m in zip(objectives, mean)},
                    "se": {name: None if s is None else float(s) for name, s in zip(objectives, se)},
                }
            )
    return points


def _mean_array(points: list[dict], objectives: Sequence[str]) -> np.ndarray:
    return np.array([[point["mean"][name] for name in objectives] for point in points], dtype=float)  # (n_points, k)


def front_metrics(points: Mapping[str, list[dict]], objectives: Sequence[str], grid: Sequence[Sequence[float]]) -> dict:
    """HV and MIP per method on shared normalisation bounds.

    Returns:
        ``{"normalization": {"lower", "upper", "reference", "error"}, "methods": {name: {"hv", "mip"}}}``;
        ``hv``/``mip`` are ``None`` (and ``error`` says why) when the points cannot be normalised, e.g. an
        objective has the same mean everywhere.
    """
    means = {method: _mean_array(method_points, objectives) for method, method_points in points.items()}
    metrics: dict = {"normalization": {"lower": None, "upper": None, "reference": [0.0] * len(objectives), "error": None}, "methods": {}}
    try:
        lower, upper = normalization_bounds(means)
    except ValueError as error:
        metrics["normalization"]["error"] = str(error)
        metrics["methods"] = {method: {"hv": None, "mip": None} for method in points}
        return metrics
    metrics["normalization"].update(
        lower={name: float(v) for name, v in zip(objectives, lower)}, upper={name: float(v) for name, v in zip(objectives, upper)}
    )
    for method, method_points in points.items():
        metrics["methods"][method] = _hv_mip(method_points, means[method], grid, lower, upper)
    return metrics


def _hv_mip(method_points: list[dict], rewards: np.ndarray, grid: Sequence[Sequence[float]], lower, upper) -> dict:
    """HV and MIP of one method's ``(n, k)`` mean rewards at its points' preferences, on shared bounds."""
    if method_points[0]["preference"] is None:
        preferences = np.asarray(grid, dtype=float)  # (G, k): one point, evaluated at every grid preference
        rewards = np.repeat(rewards[:1], len(preferences), axis=0)  # (G, k)
    else:
        preferences = np.array([point["preference"] for point in method_points], dtype=float)  # (n, k)
    summary = front_summary(preferences, rewards, lower, upper)
    return {"hv": summary["hv"], "mip": summary["mip"]}


def front_intervals(
    rows: Sequence[dict],
    points: Mapping[str, list[dict]],
    objectives: Sequence[str],
    grid: Sequence[Sequence[float]],
    samples: int = 1000,
    seed: int = 0,
) -> dict:
    """Paired-bootstrap 95% intervals of every method's HV and MIP, and of each method's difference from the first.

    Prompts are resampled with replacement, the same resample for every method (they decoded the same prompts),
    and each resample recomputes the mean points, the shared normalisation bounds, HV and MIP, so the intervals
    carry the noise of the bounds too. A method is left out (``None``) unless every one of its points has a score
    for every prompt any method was scored on.

    Returns:
        ``{"samples", "seed", "prompts", "reference", "methods": {name: {"hv", "mip", "hv_diff", "mip_diff"}}}``;
        each value is ``[low, high]`` (``*_diff``: this method minus ``reference``, the first method with
        intervals; ``None`` for the reference itself or a method left out).
    """
    check_positive_int("samples", samples)
    by_cell: dict[tuple, dict[str, list[float]]] = {}
    for row in rows:
        method, preference, prompt = row_key(row)
        by_cell.setdefault((method, preference), {})[prompt] = [row["scores"][name] for name in objectives]
    prompt_sets = [set(cell) for cell in by_cell.values()]
    shared = sorted(set.union(*prompt_sets), key=str) if prompt_sets else []
    scores: dict[str, np.ndarray] = {}  # method -> (n_points, P, k)
    for method, method_points in points.items():
        cells = [by_cell[(method, None if p["preference"] is None else tuple(float(w) for w in p["preference"]))] for p in method_points]
        if shared and all(len(cell) == len(shared) for cell in cells):
            scores[method] = np.array([[cell[prompt] for prompt in shared] for cell in cells], dtype=float)
    result: dict = {"samples": samples, "seed": seed, "prompts": len(shared), "reference": None, "methods": {}}
    result["methods"] = {method: {"hv": None, "mip": None, "hv_diff": None, "mip_diff": None} for method in points}
    if len(shared) < 2 or not scores:
        return result
    names = list(scores)
    rng = np.random.default_rng(seed)
    draws = {name: np.full((samples, 2), np.nan) for name in names}  # (samples, [hv, mip])
    for sample in range(samples):
        weights = rng.multinomial(len(shared), np.full(len(shared), 1.0 / len(shared))) / len(shared)  # (P,)
        means = {name: np.einsum("gpk,p->gk", scores[name], weights) for name in names}  # (n_points, k) each
        try:
            lower, upper = normalization_bounds(means)
        except ValueError:  # an objective constant in this resample: no HV or MIP for it
            continue
        for name in names:
            metrics = _hv_mip(points[name], means[name], grid, lower, upper)
            draws[name][sample] = (metrics["hv"], metrics["mip"])

    def interval(values: np.ndarray) -> list[float] | None:
        values = values[np.isfinite(values)]
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values.size else None

    reference = names[0]
    result["reference"] = reference
    for name in names:
        entry = result["methods"][name]
        entry["hv"], entry["mip"] = interval(draws[name][:, 0]), interval(draws[name][:, 1])
        if name != reference:
            difference = draws[name] - draws[reference]  # (samples, 2), paired: the same resample
            entry["hv_diff"], entry["mip_diff"] = interval(difference[:, 0]), interval(difference[:, 1])
    return result


def summarize(settings: dict, rows: Sequence[dict], method_runs: Sequence[dict] = (), bootstrap: int = 0, seed: int = 0) -> dict:
    """Everything a report shows, JSON-serialisable: per-method points, HV, MIP, speed, memory, parameters.

    ``bootstrap``: resamples of :func:`front_intervals` (HV and MIP intervals under ``"intervals"``); 0 skips them.
    """
    objectives = list(settings["objectives"])
    grid = settings["preferences"]
    points = preference_points(rows, objectives)
    order = [m for m in settings["methods"] if m in points] + sorted(m for m in points if m not in settings["methods"])
    metrics = front_metrics({m: points[m] for m in order}, objectives, grid) if order else {"normalization": None, "methods": {}}
    intervals = None
    if bootstrap and order and metrics["normalization"].get("error") is None:
        intervals = front_intervals(rows, {m: points[m] for m in order}, objectives, grid, samples=bootstrap, seed=seed)
    expected_prompts = settings["prompts"]["count"]
    methods = {}
    for method in order:
        method_rows = [row for row in rows if row["method"] == method]
        runs = [run for run in method_runs if run["method"] == method]
        tokens = sum(row["tokens"] for row in method_rows)
        seconds = sum(row["seconds"] for row in method_rows)
        passes = [row["model_passes_per_token"] for row in method_rows if row.get("model_passes_per_token") is not None]
        peak = [run["peak_memory_bytes"] for run in runs if run.get("peak_memory_bytes") is not None]
        uses_preference = points[method][0]["preference"] is not None
        methods[method] = {
            **metrics["methods"][method],
            "uses_preference": uses_preference,
            "points": points[method],
            "n_points": len(points[method]),
            "n_rows": len(method_rows),
            "n_prompts": len({row["prompt_id"] for row in method_rows}),
            "complete": all(p["n"] == expected_prompts for p in points[method]) and (not uses_preference or len(points[method]) == len(grid)),
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "model_passes_per_token": float(np.mean(passes)) if passes else None,
            "trainable_parameters": runs[-1]["trainable_parameters"] if runs else None,
            "peak_memory_bytes": max(peak) if peak else None,
            "memory_kind": runs[-1].get("memory_kind") if runs else None,
            "device": runs[-1].get("device") if runs else None,
        }
    return {
        "objectives": objectives,
        "grid": settings["grid"],
        "preferences": grid,
        "n_prompts": expected_prompts,
        "convention": CONVENTION,
        "normalization": metrics["normalization"],
        "methods": methods,
        "intervals": intervals,
        "settings": settings,
    }


# ---------------------------------------------------------------------------------------------- rendering


def _number(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _count(value) -> str:
    if value is None:
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return str(value)


def _bytes(value) -> str:
    if value is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


def _preference_label(preference) -> str:
    return "any" if preference is None else "(" + ", ".join(f"{w:g}" for w in preference) + ")"


def markdown_report(summary: dict) -> str:
    """``report.md``: one table row per method, then each method's mean rewards per preference."""
    objectives = summary["objectives"]
    settings = summary["settings"]
    sampling = settings.get("sampling", {})
    lines = [
        "# Preference sweep",
        "",
        (
            f"Objectives: {', '.join(objectives)}; grid {summary['grid']} points per edge ({len(summary['preferences'])} preferences); "
            f"{summary['n_prompts']} prompts from `{settings['prompts']['source']}`; scorer `{settings['scorer']['spec']}`; "
            f"max_new_tokens {sampling.get('max_new_tokens')}, temperature {sampling.get('temperature')}, seed {sampling.get('seed')}."
        ),
        "",
        "| method | HV | MIP | tokens/s | model passes/token | trainable parameters | peak memory | prompts | grid points |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, method in summary["methods"].items():
        incomplete = "" if method["complete"] else " (incomplete)"
        lines.append(
            f"| {name}{incomplete} | {_number(method['hv'])} | {_number(method['mip'])} | {_number(method['tokens_per_s'], 1)} "
            f"| {_number(method['model_passes_per_token'], 2)} | {_count(method['trainable_parameters'])} "
            f"| {_bytes(method['peak_memory_bytes'])} | {method['n_prompts']} | {method['n_points']} |"
        )
    normalization = summary["normalization"] or {}
    lines += ["", f"Conventions: {summary['convention']}."]
    if normalization.get("error"):
        lines.append(f"HV and MIP are not available: {normalization['error']}.")
    elif normalization:
        bounds = ", ".join(f"{name} [{normalization['lower'][name]:.4g}, {normalization['upper'][name]:.4g}]" for name in objectives)
        lines.append(f"Normalisation bounds (raw rewards): {bounds}; reference point (normalised): {normalization['reference']}.")
    memory_kinds = sorted({m["memory_kind"] for m in summary["methods"].values() if m["memory_kind"]})
    if memory_kinds:
        lines.append(f"Peak memory is {', '.join(memory_kinds)}.")
    lines += _interval_lines(summary.get("intervals"))
    lines += ["", "## Mean reward per preference (± standard error over prompts)", ""]
    lines.append("| method | preference | n | " + " | ".join(objectives) + " |")
    lines.append("|---|---|---:|" + "---:|" * len(objectives))
    for name, method in summary["methods"].items():
        for point in method["points"]:
            cells = [
                f"{point['mean'][o]:.4f}" + ("" if point["se"][o] is None else f" ± {point['se'][o]:.4f}") for o in objectives
            ]
            lines.append(f"| {name} | {_preference_label(point['preference'])} | {point['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _interval_lines(intervals: dict | None) -> list[str]:
    if not intervals or intervals["reference"] is None:
        return []

    def cell(value, signed: bool = False) -> str:
        return "–" if value is None else f"[{value[0]:+.3f}, {value[1]:+.3f}]" if signed else f"[{value[0]:.3f}, {value[1]:.3f}]"

    reference = intervals["reference"]
    lines = [
        "",
        f"## Uncertainty (paired bootstrap over the {intervals['prompts']} prompts, {intervals['samples']} resamples, 95%)",
        "",
        "Each resample draws the prompts with replacement, the same draw for every method, and recomputes the mean "
        f"points, the normalisation bounds, HV and MIP. Differences are the method minus `{reference}`; an interval "
        "that excludes 0 is a difference the prompts support.",
        "",
        f"| method | HV | MIP | HV − {reference} | MIP − {reference} |",
        "|---|---|---|---|---|",
    ]
    for name, entry in intervals["methods"].items():
        lines.append(f"| {name} | {cell(entry['hv'])} | {cell(entry['mip'])} | {cell(entry['hv_diff'], True)} | {cell(entry['mip_diff'], True)} |")
    return lines


def pareto_figure(summary: dict, current_point: Mapping[str, float] | Sequence[float] | None = None, current_label: str = "current answer"):
    """A plotly figure of every method's mean rewards, one curve per method, points labelled with their preference.

    Args:
        summary: the output of :func:`summarize` (or ``summary.json`` read back).
        current_point: one more point to draw, e.g. the reward of the answer the app just generated:
            ``{objective: reward}`` or rewards in ``summary["objectives"]`` order.

    With more than two objectives the figure shows the first two.
    """
    import plotly.graph_objects as go

    objectives = summary["objectives"]
    if len(objectives) < 2:
        raise ValueError(f"a Pareto figure needs at least two objectives, got {objectives}")
    x_name, y_name = objectives[:2]
    figure = go.Figure()
    for name, method in summary["methods"].items():
        points = method["points"]
        single = not method["uses_preference"]
        labels = [_preference_label(p["preference"]) for p in points]
        figure.add_trace(
            go.Scatter(
                x=[p["mean"][x_name] for p in points],
                y=[p["mean"][y_name] for p in points],
                error_x={"type": "data", "array": [p["se"][x_name] or 0.0 for p in points], "thickness": 1},
                error_y={"type": "data", "array": [p["se"][y_name] or 0.0 for p in points], "thickness": 1},
                mode="markers+text" if single else "lines+markers+text",
                marker={"size": 11 if single else 8, "symbol": "diamond" if single else "circle"},
                text=labels,
                textposition="top center",
                textfont={"size": 9},
                name=f"{name} (HV {_number(method['hv'])}, MIP {_number(method['mip'])})",
                customdata=[[p["n"]] for p in points],
                hovertemplate=f"{name} %{{text}}<br>{x_name} %{{x:.4f}}<br>{y_name} %{{y:.4f}}<br>n %{{customdata[0]}}<extra></extra>",
            )
        )
    if current_point is not None:
        values = [current_point[x_name], current_point[y_name]] if isinstance(current_point, Mapping) else list(current_point)[:2]
        figure.add_trace(
            go.Scatter(
                x=[values[0]],
                y=[values[1]],
                mode="markers+text",
                text=[current_label],
                textposition="bottom center",
                marker={"size": 16, "symbol": "star", "color": "black"},
                name=current_label,
            )
        )
    title = "Pareto fronts: mean reward per preference (± SE)"
    if len(objectives) > 2:
        title += f" — first two of {len(objectives)} objectives"
    figure.update_layout(
        title=title, xaxis_title=f"{x_name} reward", yaxis_title=f"{y_name} reward", template="plotly_white", legend={"title": "method"}
    )
    return figure


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def load_sweeps(directories: Sequence[str | os.PathLike], labels: Sequence[str] | None = None) -> tuple[dict, list[dict], list[dict]]:
    """Several sweeps of the same prompts and objectives as one: ``(settings, rows, method_runs)``.

    The settings are the first sweep's, with every method listed; a method met in more than one sweep (two
    checkpoints' ``dualhead``, a base model with and without a loop guard) is named ``method (label)`` after its
    sweep's label (``labels``, one per sweep; default its folder), so every method's points share one
    normalisation for HV and MIP.
    """
    directories = [Path(d).expanduser() for d in directories]
    if not directories:
        raise ValueError("results needs at least one sweep directory")
    if labels is not None:
        labels = [str(label) for label in labels]
        if len(labels) != len(directories) or len(set(labels)) != len(labels) or not all(label.strip() for label in labels):
            raise ValueError(f"labels must name each of the {len(directories)} sweeps once, distinct and non-empty, got {labels}")
    loaded = [(directory, *load_sweep(directory)) for directory in directories]
    first_dir, settings = directories[0], loaded[0][1]
    for directory, other, _, _ in loaded[1:]:
        if other["objectives"] != settings["objectives"]:
            raise ValueError(f"{directory} scores objectives {other['objectives']}, {first_dir} {settings['objectives']}: not comparable")
        if other["prompts"].get("fingerprint") != settings["prompts"].get("fingerprint"):
            raise ValueError(f"{directory} decoded other prompts than {first_dir} (prompt fingerprints differ): not comparable")
    if len(loaded) == 1:
        return loaded[0][1:]
    counts: dict[str, int] = {}
    for _, _, rows, _ in loaded:
        for method in {row["method"] for row in rows}:
            counts[method] = counts.get(method, 0) + 1
    # a folder named like the prompt set ("harmful") is told apart by its parent's name
    distinct = len({d.name for d in directories}) == len(directories)
    names = {d: d.name if distinct else f"{d.parent.name}/{d.name}" for d in directories}
    if labels is not None:
        names = dict(zip(directories, labels))

    def rename(method: str, directory: Path) -> str:
        return method if counts.get(method, 0) <= 1 else f"{method} ({names[directory]})"

    rows = [{**row, "method": rename(row["method"], d)} for d, _, found, _ in loaded for row in found]
    runs = [{**run, "method": rename(run["method"], d)} for d, _, _, found in loaded for run in found]
    methods = list(dict.fromkeys(rename(m, d) for d, found, _, _ in loaded for m in found["methods"]))
    grid = max((found for _, found, _, _ in loaded), key=lambda found: len(found["preferences"]))  # the finest grid
    return {**settings, "methods": methods, "grid": grid["grid"], "preferences": grid["preferences"]}, rows, runs


@dataclass
class ReportConfig:
    """What ``paretoalign report`` summarises and where it writes (the arguments of :func:`write_report`)."""

    results: list[str] = field(
        metadata={"help": "the sweep directory (written by paretoalign sweep), or several sweeps of the same prompts to compare on one normalisation"}
    )
    out: str | None = field(
        default=None, metadata={"help": "where to write report.md, pareto_front.html/png, summary.json (default: --results; needed with several)"}
    )
    labels: list[str] | None = field(
        default=None,
        metadata={"help": "one name per --results sweep, telling apart a method met in several, e.g. 'dualhead (shipped)' (default: the folders)"},
    )
    png: bool = field(default=True, metadata={"help": "also write pareto_front.png (a static export, which needs kaleido and a browser; skipped with a note when it fails)"})
    bootstrap: int = field(
        default=1000,
        metadata={"help": "paired-bootstrap resamples of the prompts for 95%% intervals of HV, MIP and their differences from the first method (0: none)"},
    )

    def write(self) -> dict:
        return write_report(self.results, self.out, png=self.png, bootstrap=self.bootstrap, labels=self.labels)


def write_report(
    results: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    png: bool = True,
    bootstrap: int = 1000,
    labels: Sequence[str] | None = None,
) -> dict:
    """Write ``report.md``, ``pareto_front.html``, ``pareto_front.png`` (when static export works) and ``summary.json``.

    Args:
        results: the sweep directory, or several sweeps of the same prompts (:func:`load_sweeps`), compared on one
            normalisation.
        out: where to write (default: ``results``; required with several sweeps).
        png: try the static PNG export (plotly needs ``kaleido`` and a Chrome); a failure is recorded, not raised.
        bootstrap: resamples for the HV/MIP intervals (:func:`front_intervals`); 0 skips them.
        labels: one name per sweep, telling apart a method met in several (default: the sweeps' folders).

    Returns:
        The summary, with ``files`` naming what was written and ``png_skipped`` the reason a PNG was not.
    """
    if not is_int(bootstrap, 0):
        raise ValueError(f"bootstrap must be 0 (no intervals) or a positive number of resamples, got {bootstrap!r}")
    several = not isinstance(results, (str, os.PathLike))
    if several and len(results) > 1 and out is None:
        raise ValueError("out is required when results names several sweeps")
    settings, rows, method_runs = load_sweeps(results if several else [results], labels)
    if several:
        results = results[0]
    if not rows:
        raise ValueError(f"results {str(results)!r} holds no result rows yet; run the sweep first")
    out = Path(out if out is not None else results).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(settings, rows, method_runs, bootstrap=bootstrap)
    files = {"markdown": MARKDOWN_NAME, "html": None, "png": None, "summary": SUMMARY_NAME}
    summary["files"], summary["png_skipped"] = files, None
    _write_text(out / MARKDOWN_NAME, markdown_report(summary))
    if len(summary["objectives"]) >= 2:
        figure = pareto_figure(summary)
        _write_text(out / HTML_NAME, figure.to_html(include_plotlyjs=True, full_html=True))  # self-contained: works offline
        files["html"] = HTML_NAME
        if png:
            try:
                image = figure.to_image(format="png", width=900, height=650)
                atomic_write(out / PNG_NAME, lambda tmp: Path(tmp).write_bytes(image))
                files["png"] = PNG_NAME
            except Exception as error:  # noqa: BLE001 -- the PNG is optional: kaleido or Chrome missing, or kaleido failing
                summary["png_skipped"] = " ".join(str(error).split())[:300] or type(error).__name__
                print(f"{PNG_NAME} skipped: static image export is unavailable ({summary['png_skipped'][:120]})", file=sys.stderr)
    else:
        summary["png_skipped"] = "a Pareto figure needs at least two objectives"
    write_json(out / SUMMARY_NAME, summary, sort_keys=False)
    return summary


def json_summary(summary: dict) -> dict:
    """The short machine-readable form ``paretoalign report --json`` prints."""
    keys = ("hv", "mip", "tokens_per_s", "model_passes_per_token", "trainable_parameters", "peak_memory_bytes", "n_prompts", "n_points", "complete")
    return {
        "methods": {name: {key: method[key] for key in keys} for name, method in summary["methods"].items()},
        "intervals": summary.get("intervals"),
        "objectives": summary["objectives"],
        "normalization": summary["normalization"],
        "files": summary.get("files"),
        "png_skipped": summary.get("png_skipped"),
    }
