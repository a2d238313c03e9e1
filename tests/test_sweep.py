"""Preference sweeps and their reports: prompt files, resuming, settings checks, HV/MIP by hand, every method on a tiny model."""

import gzip
import json
import math

import numpy as np
import pytest

from paretoalign.cli import main
from paretoalign.data import PreferencePair
from paretoalign.evaluation import report, sweep
from paretoalign.evaluation.report import pareto_figure, summarize, write_report
from paretoalign.evaluation.sweep import SweepConfig, load_prompts, read_results, run_sweep
from paretoalign.methods import METHODS, build_decoder, register_method, trainable_parameters

PROMPTS = ["How do I pick a lock?", "Hi", "Tell me about bread."]


class CharacterScorer:
    """A deterministic scorer: harmlessness = -vowels / 10, helpfulness = length / 10 (columns in the opposite order)."""

    objectives = ("harmlessness", "helpfulness")

    def score(self, prompts, responses, batch_size=32):
        assert len(prompts) == len(responses)
        return np.array([[-sum(c in "aeiou" for c in r) / 10, len(r) / 10] for r in responses], dtype=np.float64)

    def describe(self):
        return {"kind": "characters", "objectives": list(self.objectives)}


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def sweep_config(prompts_file, out, **overrides):
    settings = {"methods": ["dualhead", "base"], "grid": 3, "max_new_tokens": 4, "batch_size": 4, **overrides}
    return SweepConfig(prompts=prompts_file, out=str(out), **settings)


def by_key(rows):
    return {sweep.row_key(row): row for row in rows}


# ---------------------------------------------------------------------------------------------- prompts


def test_prompt_file_formats(tmp_path):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bread?"}]
    jsonl = tmp_path / "prompts.jsonl"
    records = [{"prompt": "How do I pick a lock?"}, {"prompt": conversation}, {"prompt": "How do I pick a lock?"}]
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    loaded = load_prompts(jsonl)
    assert [p.prompt for p in loaded] == ["How do I pick a lock?", conversation]  # the duplicate is dropped
    assert loaded[0].id == sweep.prompt_id("How do I pick a lock?") and len(loaded[0].id) == 16

    hh = tmp_path / "pairs.jsonl.gz"
    transcript = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bread?\n\nAssistant: "
    with gzip.open(hh, "wt") as handle:
        handle.write(json.dumps({"chosen": transcript + "Flour and water.", "rejected": transcript + "No."}) + "\n")
    assert [p.prompt for p in load_prompts(hh)] == [conversation]

    text = tmp_path / "prompts.txt"
    text.write_text("first\n\n  second  \nthird\n")
    assert [p.prompt for p in load_prompts(text)] == ["first", "second", "third"]
    assert [p.prompt for p in load_prompts(text, limit=2)] == ["first", "second"]
    for limit in (0, True, 1.5):
        with pytest.raises(ValueError, match=f"limit must be a positive integer, got {limit!r}"):
            load_prompts(text, limit=limit)


def test_split_prompts_are_the_deduplicated_test_prompts(monkeypatch):
    shared = [{"role": "user", "content": "shared"}]
    pools = {
        "helpfulness": [PreferencePair(shared, "a", "b", "helpfulness", "s"), PreferencePair([{"role": "user", "content": "h"}], "a", "b", "helpfulness", "s")],
        "harmlessness": [PreferencePair(shared, "c", "d", "harmlessness", "s")],
    }
    monkeypatch.setattr("paretoalign.data.load_default_pairs", lambda: pools)
    monkeypatch.setattr("paretoalign.data.split_pairs", lambda pairs, seed=0, fractions=None: {"test": list(pairs), "train": []})
    assert [p.prompt for p in load_prompts("split:test")] == [shared, [{"role": "user", "content": "h"}]]
    assert [p.prompt for p in load_prompts("split:test:harmlessness")] == [shared]
    with pytest.raises(ValueError, match="'honesty' has no vendored pairs"):
        load_prompts("split:test:honesty")


@pytest.mark.parametrize(
    "content, message",
    [("\n\n", "holds no prompts"), ('{"text": "x"}\n', "expected a 'prompt' key"), ('{"prompt": 3}\n', "must be a string or a list")],
)
def test_bad_prompt_files(tmp_path, content, message):
    path = tmp_path / ("prompts.txt" if content.strip() == "" else "prompts.jsonl")
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_prompts(path)


def test_bad_arguments_name_the_argument(prompts_file, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        sweep_config(prompts_file, tmp_path, methods=["dualhead", "nope"])
    with pytest.raises(ValueError, match=r"grid must be an integer >= 2 .*, got 1"):
        sweep_config(prompts_file, tmp_path, grid=1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        sweep_config(prompts_file, tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="split:NAME"):
        load_prompts("split:holdout")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompts(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------------------------- running


def test_interrupted_sweep_resumes_to_the_same_rows(make_model, prompts_file, tmp_path):
    model, scorer = make_model(), CharacterScorer()
    whole = run_sweep(sweep_config(prompts_file, tmp_path / "whole"), model=model, scorer=scorer, progress=False)
    assert whole == {"directory": str(tmp_path / "whole"), "written": 3 * 3 + 3, "skipped": 0, "total": 12}

    class Interrupt(Exception):
        pass

    def stop(rows):
        raise Interrupt

    config = sweep_config(prompts_file, tmp_path / "resumed")
    with pytest.raises(Interrupt):
        run_sweep(config, model=model, scorer=scorer, progress=False, after_batch=stop)
    results = tmp_path / "resumed" / sweep.RESULTS_NAME
    assert len(read_results(results)) == config.batch_size
    with open(results, "a") as handle:  # a write cut off by a crash
        handle.write('{"method": "dualhead", "prefer')
    resumed = run_sweep(config, model=model, scorer=scorer, progress=False)
    assert resumed["written"] == 12 - config.batch_size and resumed["skipped"] == config.batch_size

    expected, rows = read_results(tmp_path / "whole" / sweep.RESULTS_NAME), read_results(results)
    assert len(rows) == len(by_key(rows)) == 12  # nothing duplicated, the partial line repaired away
    assert results.read_text().endswith("}\n")
    for key, row in by_key(expected).items():
        got = by_key(rows)[key]
        assert {k: got[k] for k in row if k != "seconds"} == {k: row[k] for k in row if k != "seconds"}
    assert run_sweep(config, model=model, scorer=scorer, progress=False)["written"] == 0

    runs = read_results(tmp_path / "resumed" / sweep.METHOD_RUNS_NAME)
    assert [run["method"] for run in runs] == ["dualhead", "dualhead", "base"]  # the interrupted run is logged too
    assert all(run["peak_memory_bytes"] > 0 for run in runs)


def test_rows_follow_the_schema(make_model, prompts_file, tmp_path):
    model = make_model()
    run_sweep(sweep_config(prompts_file, tmp_path), model=model, scorer=CharacterScorer(), progress=False)
    rows = read_results(tmp_path / sweep.RESULTS_NAME)
    dualhead = [row for row in rows if row["method"] == "dualhead"]
    base = [row for row in rows if row["method"] == "base"]
    assert sorted({tuple(row["preference"]) for row in dualhead}) == [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]
    assert [row["preference"] for row in base] == [None] * 3  # the preference is ignored: one run per prompt
    row = dualhead[0]
    assert set(row) == {"method", "preference", "prompt_id", "prompt_index", "prompt", "text", "scores", "tokens",
                        "finish_reason", "seconds", "model_passes_per_token", "base_nll", "seed"}
    assert all(r["base_nll"] is None or r["base_nll"] >= 0 for r in rows) and any(r["base_nll"] is not None for r in rows)
    assert row["scores"] == {"helpfulness": len(row["text"]) / 10, "harmlessness": -sum(c in "aeiou" for c in row["text"]) / 10}
    assert all(r["model_passes_per_token"] == 1.0 for r in rows)  # one backbone pass per token for both methods
    # Every row of a prompt shares one seed, whatever its method or preference.
    assert len({(r["prompt_id"], r["seed"]) for r in rows}) == 3
    settings = json.loads((tmp_path / sweep.SETTINGS_NAME).read_text())
    assert settings["preferences"] == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    assert settings["scorer"]["spec"].endswith("CharacterScorer") and settings["prompts"]["count"] == 3


def test_changed_settings_are_refused_and_methods_can_be_added(make_model, prompts_file, tmp_path):
    model, scorer = make_model(), CharacterScorer()
    run_sweep(sweep_config(prompts_file, tmp_path, methods=["base"]), model=model, scorer=scorer, progress=False)
    with pytest.raises(ValueError, match=r"grid: 3 -> 5.*preferences") as error:
        run_sweep(sweep_config(prompts_file, tmp_path, methods=["base"], grid=5), model=model, scorer=scorer, progress=False)
    assert "sampling.max_new_tokens" not in str(error.value)
    with pytest.raises(ValueError, match=r"sampling.max_new_tokens: 4 -> 6"):
        run_sweep(sweep_config(prompts_file, tmp_path, methods=["base"], max_new_tokens=6), model=model, scorer=scorer, progress=False)
    with pytest.raises(ValueError, match=r"sampling.no_repeat_ngram_size: null -> 4"):  # recorded when the guard is on
        run_sweep(sweep_config(prompts_file, tmp_path, methods=["base"], no_repeat_ngram_size=4), model=model, scorer=scorer, progress=False)
    with pytest.raises(ValueError, match=r"prompts.count: 3 -> 2"):
        run_sweep(sweep_config(prompts_file, tmp_path, methods=["base"], limit=2), model=model, scorer=scorer, progress=False)
    with pytest.raises(ValueError, match=r"model.heads_fingerprint"):  # other head weights
        run_sweep(sweep_config(prompts_file, tmp_path, methods=["base"]), model=make_model(randomize=False), scorer=scorer, progress=False)
    added = run_sweep(sweep_config(prompts_file, tmp_path, methods=["base", "dualhead"], batch_size=2), model=model, scorer=scorer, progress=False)
    assert added["written"] == 9 and added["skipped"] == 3
    assert json.loads((tmp_path / sweep.SETTINGS_NAME).read_text())["methods"] == ["base", "dualhead"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_runs_on_the_tiny_model(make_model, prompts_file, tmp_path, name, baseline_checkpoints):
    model = make_model()
    config = sweep_config(prompts_file, tmp_path, methods=[name], grid=2, limit=1, max_new_tokens=3)
    result = run_sweep(config, model=model, scorer=CharacterScorer(), progress=False)
    assert result["written"] == (2 if METHODS[name].uses_preference else 1)
    rows = read_results(tmp_path / sweep.RESULTS_NAME)
    assert all(0 <= row["tokens"] <= 3 and row["model_passes_per_token"] >= 1 for row in rows)
    (run,) = read_results(tmp_path / sweep.METHOD_RUNS_NAME)
    assert run["trainable_parameters"] >= 0 and run["rows"] == len(rows)


def test_trainable_parameters_per_method(make_model):
    model = make_model()
    heads = sum(t.numel() for t in model.trainable_state_dict().values())
    assert trainable_parameters(build_decoder("dualhead", model)) == heads > 0
    assert trainable_parameters(build_decoder("base", model)) == 0


def test_registering_a_method_is_one_line(make_model, prompts_file, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "backbone-again", METHODS["base"])  # keep the registry clean for other tests
    register_method("backbone-again", "paretoalign.methods:_base", uses_preference=False)
    rows = run_sweep(sweep_config(prompts_file, tmp_path, methods=["backbone-again", "base"], limit=1), model=make_model(),
                     scorer=CharacterScorer(), progress=False)
    assert rows["written"] == 2
    texts = {row["method"]: row["text"] for row in read_results(tmp_path / sweep.RESULTS_NAME)}
    assert texts["backbone-again"] == texts["base"]


# ---------------------------------------------------------------------------------------------- aggregation


def crafted_sweep():
    """Method ``a`` on a 3-point grid and a preference-free ``base``, two prompts each, numbers chosen by hand."""
    settings = {
        "objectives": ["help", "harm"],
        "grid": 3,
        "preferences": [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]],
        "methods": ["a", "base"],
        "prompts": {"source": "crafted", "count": 2},
        "scorer": {"spec": "hand"},
        "sampling": {"max_new_tokens": 10, "temperature": 0.0, "seed": 0},
    }
    scores = {  # (method, preference) -> [(help, harm) of prompt p1, of prompt p2]
        ("a", (0.0, 1.0)): [(0, 4), (2, 6)],  # mean (1, 5)
        ("a", (0.5, 0.5)): [(3, 3), (5, 5)],  # mean (4, 4)
        ("a", (1.0, 0.0)): [(4, 0), (6, 2)],  # mean (5, 1)
        ("base", None): [(1, 1), (3, 3)],  # mean (2, 2)
    }
    rows = []
    for (method, preference), pairs in scores.items():
        for prompt, (help_, harm) in zip(["p1", "p2"], pairs):
            rows.append({
                "method": method, "preference": None if preference is None else list(preference), "prompt_id": prompt,
                "scores": {"help": help_, "harm": harm}, "tokens": 10 if method == "a" else 4,
                "seconds": 0.5 if method == "a" else 0.1, "model_passes_per_token": 1.0,
            })
    runs = [{"method": "a", "trainable_parameters": 1234, "peak_memory_bytes": 2**20, "memory_kind": "test"}]
    return settings, rows, runs


def test_aggregation_by_hand():
    settings, rows, runs = crafted_sweep()
    summary = summarize(settings, rows, runs)
    a, base = summary["methods"]["a"], summary["methods"]["base"]
    assert [p["mean"] for p in a["points"]] == [{"help": 1, "harm": 5}, {"help": 4, "harm": 4}, {"help": 5, "harm": 1}]
    # std(ddof=1) of two values 2 apart is sqrt(2); over sqrt(n=2) prompts the standard error is 1.
    assert all(p["se"] == {"help": 1.0, "harm": 1.0} and p["n"] == 2 for p in a["points"] + base["points"])
    assert summary["normalization"]["lower"] == {"help": 1.0, "harm": 1.0}
    assert summary["normalization"]["upper"] == {"help": 5.0, "harm": 5.0}
    assert summary["normalization"]["reference"] == [0.0, 0.0]
    # Normalised: a -> (0, 1), (0.75, 0.75), (1, 0); base -> (0.25, 0.25). From (0, 0) only interior points add volume.
    assert a["hv"] == pytest.approx(0.75 * 0.75)
    assert base["hv"] == pytest.approx(0.25 * 0.25)
    assert a["mip"] == pytest.approx((1.0 + 0.75 + 1.0) / 3)
    assert base["mip"] == pytest.approx(0.25)  # one point, evaluated at every grid preference
    assert (a["n_points"], base["n_points"], a["complete"], base["complete"]) == (3, 1, True, True)
    assert a["tokens_per_s"] == pytest.approx(20.0) and base["tokens_per_s"] == pytest.approx(40.0)
    assert a["trainable_parameters"] == 1234 and base["trainable_parameters"] is None
    json.dumps(summary)  # serialisable as it is


def test_single_prompt_has_no_standard_error_and_one_method_alone_has_no_hv():
    settings, rows, _ = crafted_sweep()
    only_base = [row for row in rows if row["method"] == "base" and row["prompt_id"] == "p1"]
    summary = summarize({**settings, "methods": ["base"]}, only_base)
    (point,) = summary["methods"]["base"]["points"]
    assert point["se"] == {"help": None, "harm": None} and point["n"] == 1
    assert summary["methods"]["base"]["hv"] is None and "same value" in summary["normalization"]["error"]
    assert summary["methods"]["base"]["complete"] is False


def random_sweep(prompts: int = 12, seed: int = 0):
    """Methods ``a`` and ``b`` with noisy scores on a 3-point grid, ``twin`` a copy of ``a`` under another name."""
    settings, _, _ = crafted_sweep()
    rng = np.random.default_rng(seed)
    rows = []
    for method, shift in (("a", 0.0), ("b", 0.3)):
        for preference in settings["preferences"]:
            for prompt in range(prompts):
                help_, harm = rng.normal(size=2) + np.array(preference) * 2 + shift
                rows.append({"method": method, "preference": preference, "prompt_id": f"p{prompt}",
                             "scores": {"help": float(help_), "harm": float(harm)}, "tokens": 1, "seconds": 1.0})
    rows += [{**row, "method": "twin"} for row in rows if row["method"] == "a"]
    return {**settings, "methods": ["a", "b", "twin"], "prompts": {"source": "random", "count": prompts}}, rows


def test_bootstrap_intervals_are_paired_over_prompts():
    settings, rows = random_sweep()
    summary = summarize(settings, rows, bootstrap=300)
    intervals = summary["intervals"]
    assert (intervals["reference"], intervals["prompts"], intervals["samples"]) == ("a", 12, 300)
    a, b, twin = (intervals["methods"][name] for name in ("a", "b", "twin"))
    for name, entry in (("a", a), ("b", b)):
        for key in ("hv", "mip"):
            low, high = entry[key]
            assert low < high and low <= summary["methods"][name][key] <= high  # resampling moves it; the estimate inside
    assert a["hv_diff"] is None and a["mip_diff"] is None  # the reference
    # The same resample for every method: a copy of the reference differs from it by exactly 0 in every resample,
    # although its own HV moves as much as the reference's.
    assert twin["hv_diff"] == [0.0, 0.0] and twin["mip_diff"] == [0.0, 0.0] and twin["hv"] == a["hv"]
    assert b["hv_diff"][0] < b["hv_diff"][1]
    assert summarize(settings, rows)["intervals"] is None  # bootstrap=0: none
    with pytest.raises(ValueError, match="samples must be a positive integer, got -2"):
        summarize(settings, rows, bootstrap=-2)


def test_bootstrap_intervals_without_noise_collapse_and_leave_out_incomplete_methods():
    settings, rows = random_sweep(prompts=4)
    same = [{**row, "scores": dict(rows[0 if row["preference"] == [0.0, 1.0] else 4 if row["preference"] == [0.5, 0.5] else 8]["scores"])}
            for row in rows if row["method"] == "a"]  # every prompt scored alike at each preference
    same += [{**row, "method": "b", "scores": {k: v + 0.5 for k, v in row["scores"].items()}} for row in same]
    partial = [{**row, "method": "partial"} for row in same[:12] if row["prompt_id"] != "p3" or row["preference"] != [0.5, 0.5]]
    summary = summarize({**settings, "methods": ["a", "b", "partial"]}, same + partial, bootstrap=50)
    for name in ("a", "b"):
        hv, mip = summary["methods"][name]["hv"], summary["methods"][name]["mip"]
        assert summary["intervals"]["methods"][name]["hv"] == pytest.approx([hv, hv])
        assert summary["intervals"]["methods"][name]["mip"] == pytest.approx([mip, mip])
    assert summary["intervals"]["methods"]["partial"] == {"hv": None, "mip": None, "hv_diff": None, "mip_diff": None}
    assert summary["methods"]["partial"]["hv"] is not None  # the point estimate is still reported


def write_crafted(directory):
    settings, rows, runs = crafted_sweep()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / sweep.SETTINGS_NAME).write_text(json.dumps(settings))
    sweep.append_rows(directory / sweep.RESULTS_NAME, rows + rows[:1])  # a duplicated row counts once
    sweep.append_rows(directory / sweep.METHOD_RUNS_NAME, runs)


def test_report_files_and_json(tmp_path, capsys):
    write_crafted(tmp_path / "sweep")
    assert main(["report", "--results", str(tmp_path / "sweep"), "--out", str(tmp_path / "report"), "--json"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed["methods"]["a"]["hv"] == pytest.approx(0.5625) and printed["methods"]["base"]["mip"] == pytest.approx(0.25)
    assert printed["methods"]["a"]["tokens_per_s"] == pytest.approx(20.0)
    markdown = (tmp_path / "report" / report.MARKDOWN_NAME).read_text()
    assert "| a | 0.562 | 0.917 | 20.0 | 1.00 | 1.23 k | 1.00 MiB | 2 | 3 |" in markdown
    # The crafted prompts differ by a shift of both scores, which the shared normalisation removes: no HV noise.
    assert "## Uncertainty (paired bootstrap over the 2 prompts, 1000 resamples, 95%)" in markdown
    assert "| a | [0.562, 0.562] | [0.917, 0.917] | – | – |" in markdown
    assert printed["intervals"]["methods"]["base"]["hv_diff"] == pytest.approx([0.0625 - 0.5625] * 2)
    assert "| base | any | 2 | 2.0000 ± 1.0000 | 2.0000 ± 1.0000 |" in markdown
    html = (tmp_path / "report" / report.HTML_NAME).read_text()
    assert "plotly" in html.lower() and "(0.5, 0.5)" in html
    summary = json.loads((tmp_path / "report" / report.SUMMARY_NAME).read_text())
    if summary["files"]["png"] is None:  # no kaleido/Chrome here: one notice, recorded, no crash
        assert summary["png_skipped"] and "pareto_front.png skipped" in captured.err
    else:
        assert (tmp_path / "report" / report.PNG_NAME).stat().st_size > 0


def test_report_bootstrap_option(tmp_path, capsys):
    write_crafted(tmp_path / "sweep")
    with pytest.raises(SystemExit) as raised:
        main(["report", "--results", str(tmp_path / "sweep"), "--bootstrap", "-1", "--no-png"])
    assert raised.value.code == 2 and "bootstrap must be 0 (no intervals) or a positive number of resamples, got -1" in capsys.readouterr().err
    assert main(["report", "--results", str(tmp_path / "sweep"), "--bootstrap", "0", "--no-png", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["intervals"] is None
    assert "Uncertainty" not in (tmp_path / "sweep" / report.MARKDOWN_NAME).read_text()


def test_several_sweeps_share_one_normalisation(tmp_path, capsys):
    write_crafted(tmp_path / "one")
    settings, rows, _ = crafted_sweep()
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / sweep.SETTINGS_NAME).write_text(json.dumps({**settings, "methods": ["a"]}))
    shifted = [{**row, "scores": {k: v + 1 for k, v in row["scores"].items()}} for row in rows if row["method"] == "a"]
    sweep.append_rows(tmp_path / "two" / sweep.RESULTS_NAME, shifted)
    out = tmp_path / "both"
    assert main(["report", "--results", str(tmp_path / "one"), str(tmp_path / "two"), "--out", str(out), "--json", "--no-png"]) == 0
    methods = json.loads(capsys.readouterr().out)["methods"]
    # Means: a (one) (1, 5), (4, 4), (5, 1); a (two) (2, 6), (5, 5), (6, 2); base (2, 2); bounds 1..6 on both axes.
    assert set(methods) == {"a (one)", "a (two)", "base"}
    assert methods["a (one)"]["hv"] == pytest.approx(0.6 * 0.6)
    assert methods["a (two)"]["hv"] == pytest.approx(0.2 * 1.0 + 0.6 * 0.8 + 0.2 * 0.2)
    assert methods["base"]["hv"] == pytest.approx(0.2 * 0.2)
    with pytest.raises(ValueError, match="out is required"):
        write_report([tmp_path / "one", tmp_path / "two"])
    labelled = ["--labels", "first", "second"]
    assert main(["report", "--results", str(tmp_path / "one"), str(tmp_path / "two"), "--out", str(out), "--json", "--no-png", *labelled]) == 0
    methods = json.loads(capsys.readouterr().out)["methods"]
    assert set(methods) == {"a (first)", "a (second)", "base"} and methods["a (first)"]["hv"] == pytest.approx(0.6 * 0.6)
    with pytest.raises(ValueError, match=r"labels must name each of the 2 sweeps once, distinct and non-empty, got \['x', 'x'\]"):
        write_report([tmp_path / "one", tmp_path / "two"], out, labels=["x", "x"])
    (tmp_path / "two" / sweep.SETTINGS_NAME).write_text(json.dumps({**settings, "prompts": {"fingerprint": "other"}}))
    with pytest.raises(ValueError, match="decoded other prompts"):
        write_report([tmp_path / "one", tmp_path / "two"], out)


def test_pareto_figure_draws_the_current_answer(tmp_path):
    write_crafted(tmp_path)
    summary = write_report(tmp_path, png=False)
    figure = pareto_figure(summary, current_point={"help": 3.0, "harm": 2.5})
    assert [trace.name.split(" ")[0] for trace in figure.data] == ["a", "base", "current"]
    assert list(figure.data[-1].x) == [3.0] and list(figure.data[-1].y) == [2.5]
    assert list(figure.data[0].text) == ["(0, 1)", "(0.5, 0.5)", "(1, 0)"] and list(figure.data[1].text) == ["any"]
    assert list(figure.data[0].error_y.array) == [1.0, 1.0, 1.0]


def test_cli_sweep_then_report(make_model, backbone, tokenizer, prompts_file, tmp_path, capsys, monkeypatch):
    directory = tmp_path / "tiny-backbone"
    backbone.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    model = make_model()
    model.config.backbone = str(directory)
    model.save_pretrained(tmp_path / "checkpoint")
    monkeypatch.setattr(sweep, "_load_scorer", lambda spec, device: CharacterScorer())
    out = tmp_path / "sweep"
    argv = ["sweep", "--prompts", prompts_file, "--methods", "dualhead,base", "--grid", "3", "--max-new-tokens", "3",
            "--seed", "0", "--out", str(out), "--checkpoint", str(tmp_path / "checkpoint"), "--limit", "2", "--no-progress"]
    assert main(argv) == 0
    assert "8 rows written, 0 already done, 8 in the sweep" in capsys.readouterr().out
    assert main(argv) == 0
    assert "0 rows written, 8 already done" in capsys.readouterr().out
    # the options come from SweepConfig's fields: space-separated methods and the underscore spelling work too
    assert main([*argv, "--methods", "dualhead", "base", "--max_new_tokens", "3"]) == 0
    assert "0 rows written, 8 already done" in capsys.readouterr().out
    for extra, message in [
        (["--methods", "dualhead,nope"], "unknown method 'nope'"),
        (["--grid", "4"], "grid: 3 -> 4"),
        (["--fusion", "sum"], "fusion must be one of"),
        (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert main(["report", "--results", str(out), "--json", "--no-png"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["methods"]) == {"dualhead", "base"}
    assert all(math.isfinite(m["tokens_per_s"]) and m["model_passes_per_token"] == 1.0 for m in printed["methods"].values())


def test_a_reward_branch_counts_as_its_share_of_a_backbone_pass(make_model, prompts_file, tmp_path):
    model = make_model(reward_layers=1)  # 1 of the tiny backbone's 2 blocks, re-run per token
    run_sweep(sweep_config(prompts_file, tmp_path, methods=["dualhead"]), model=model, scorer=CharacterScorer(), progress=False)
    rows = read_results(tmp_path / sweep.RESULTS_NAME)
    assert rows and all(row["model_passes_per_token"] == pytest.approx(1.5) for row in rows)
