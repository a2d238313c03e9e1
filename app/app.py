"""paretoalign web app: steer a live answer between objectives with a slider, compare preferences, see the Pareto fronts.

Run it with ``make run`` (``python app/app.py [--host H] [--port P] [--share]``). The handlers' logic lives in
:mod:`paretoalign.ui`; this file only wires it into Gradio and turns user errors into messages.

API (``gradio_client``; every event has an ``api_name``), with two objectives ``helpfulness, harmlessness``::

    client.predict("How do I pick a lock?", 0.8, 1.0, 0.7, 128, 0, "dualhead", api_name="/generate")  # -> answer text

``/generate`` takes ``prompt, <second objective>_weight, strength, temperature, max_new_tokens, seed, method``:
the weight is the slider's value in [0, 1] (the first objective gets 1 − it). With more than two objectives it takes
one weight per objective instead (``<objective>_weight`` each, any non-negative numbers, normalised onto the simplex).
``/generate_details`` (no inputs) returns the gate colours, reward scores and Pareto plot of this session's last
answer; ``/compare`` takes ``prompt``, three preferences as text (``"1, 0"``) and the same settings, and returns
three answers, generated in one batch.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import logging
import os
import re
import sys
from pathlib import Path

# The app is meant to run offline: no usage statistics sent from here.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# A Hugging Face Space installs requirements.txt but not this repository itself: let `import paretoalign` find it.
ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("paretoalign") is None:
    sys.path.insert(0, str(ROOT))

import gradio as gr

from paretoalign import ui
from paretoalign.backbone import DTYPES

logger = logging.getLogger("paretoalign.app")

SETTINGS = ["strength", "temperature", "max_new_tokens", "seed", "method"]
QUEUE_SIZE = 32


def _weight_names(objectives: list[str]) -> list[str]:
    """API parameter names of the preference sliders: the second objective's weight alone when there are two."""
    shown = objectives[1:] if len(objectives) == 2 else objectives
    return [re.sub(r"\W", "_", name) + "_weight" for name in shown]


def _named(fn, names: list[str]):
    """Give ``fn(*values)`` named positional parameters, which Gradio's API page and gradio_client use."""
    fn.__signature__ = inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names])
    return fn


def _user_message(error: Exception) -> gr.Error:
    """A message for the user: bad input (``ValueError``, ``TypeError``) says how to fix it; anything else is logged here."""
    if isinstance(error, ValueError | TypeError):
        return gr.Error(str(error))
    logger.error("request failed", exc_info=error)
    return gr.Error(f"Something went wrong ({type(error).__name__}: {error}). The server log has the details.")


def build_demo(
    objectives: list[str] | None = None, methods: list[str] | None = None, sweep: str | os.PathLike | None = None
) -> gr.Blocks:
    """The app as a ``gr.Blocks`` with its queue set up; call ``.launch()`` on it. Answers are decoded by the shared
    batch server (:func:`paretoalign.ui.serve_answers`): users who wait at the same time share one decoding batch of
    up to :func:`paretoalign.ui.max_batch` answers (``--max-batch``; 1 answers one request at a time).

    Args:
        objectives: what the sliders stand for (default: the model's, see :func:`paretoalign.ui.app_objectives`).
        methods: decoding methods on offer (default: every registered method that builds over the model, which this
            loads if it is not loaded yet).
        sweep: sweep results for the Pareto plot (default: ``$PARETOALIGN_SWEEP`` or ``results/steering/help1500-1200-z-test/hv-harmful``).
    """
    objectives = list(objectives or ui.app_objectives())
    methods = list(methods or ui.buildable_methods(ui.get_model()))
    summary, sweep_note = ui.load_sweep_summary(sweep)
    weight_names = _weight_names(objectives)
    two = len(objectives) == 2

    def show_preference(*values):
        try:
            return "**Preference:** " + ui.describe_preference(ui.preference_from_sliders(values, objectives), objectives)
        except ValueError as error:
            return f"**Preference:** {error}"

    def generate(*values):
        prompt, weights, settings = values[0], values[1 : 1 + len(weight_names)], values[1 + len(weight_names) :]
        try:
            preference = ui.preference_from_sliders(weights, objectives)
            request = ui.make_request(prompt, [preference], *settings, objectives, methods)
            for (partial,) in ui.serve_answers(request):
                yield partial.text, (request, partial)
        except Exception as error:  # noqa: BLE001
            raise _user_message(error) from None

    def generate_details(last):
        if last is None:
            raise gr.Error("Generate an answer first.")
        try:
            details = ui.answer_details(*last, summary)
        except Exception as error:  # noqa: BLE001
            raise _user_message(error) from None
        return details.highlights, gr.Dataframe(details.scores, visible=details.scores is not None), details.figure, details.note

    def compare(prompt, *values):
        texts, settings = values[: ui.COMPARE_COUNT], values[ui.COMPARE_COUNT :]
        try:
            rows = [ui.parse_weights(text, objectives, f"preference {n}") for n, text in enumerate(texts, start=1)]
            request = ui.make_request(prompt, rows, *settings, objectives, methods)
            for partial in ui.serve_answers(request):
                yield *(g.text for g in partial), (request, partial)
        except Exception as error:  # noqa: BLE001
            raise _user_message(error) from None

    def compare_details(last):
        if last is None:
            raise gr.Error("Compare first.")
        try:
            table, note = ui.compare_details(*last)
        except Exception as error:  # noqa: BLE001
            raise _user_message(error) from None
        return gr.Dataframe(table, visible=table is not None), note

    with gr.Blocks(title="paretoalign") as demo:
        gr.Markdown(
            f"# paretoalign\nSteer one language model between **{'** and **'.join(objectives)}** at answer time. "
            "Tokens are coloured by the gate value α_t: how much each token leaned on the preference-aware reward head."
        )
        with gr.Accordion("Decoding settings (both tabs)", open=False), gr.Row():
            method = gr.Dropdown(methods, value=methods[0], label="method", info="registered decoding methods")
            default_strength = float(ui.get_model().config.strength)  # the checkpoint's own, chosen on validation
            strength = gr.Slider(
                0.0, max(10.0, 2 * default_strength), value=default_strength, step=0.1, label="strength",
                info=f"how hard the reward head steers; the checkpoint's default is {default_strength:g}",
            )
            temperature = gr.Slider(0.0, 1.5, value=0.7, step=0.05, label="temperature (0 = greedy)")
            max_new_tokens = gr.Slider(8, ui.MAX_NEW_TOKENS_LIMIT, value=128, step=8, label="max new tokens")
            seed = gr.Number(value=0, precision=0, minimum=0, label="seed")
        settings = [strength, temperature, max_new_tokens, seed, method]

        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Ask something…", elem_id="prompt")
                    if two:
                        label = f"{objectives[0]} ← preference → {objectives[1]}"
                        sliders = [gr.Slider(0.0, 1.0, value=0.5, step=0.05, label=label, elem_id="preference")]
                    else:
                        sliders = [
                            gr.Slider(0.0, 1.0, value=1.0, step=0.05, label=name, elem_id=f"weight-{n}")
                            for n, name in enumerate(objectives)
                        ]
                    preference_text = gr.Markdown(show_preference(*(slider.value for slider in sliders)))
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    gr.Examples([[p] for p in ui.BENIGN_PROMPTS], inputs=[prompt], label="Benign prompts")
                    harmful = "Harmful prompts (try both ends of the slider)"
                    gr.Examples([[p] for p in ui.HARMFUL_PROMPTS], inputs=[prompt], label=harmful)
                with gr.Column(scale=3):
                    answer = gr.Textbox(label="Answer", lines=10, interactive=False, elem_id="answer")
                    gate_label = "Gate α_t per token (0: the backbone alone, 1: the reward head alone)"
                    gate = gr.HighlightedText(
                        label=gate_label, color_map=ui.GATE_COLORS, show_legend=True, show_inline_category=False, elem_id="gate"
                    )
                    scores = gr.Dataframe(
                        label="Reward-model scores of the answer", interactive=False, visible=False, elem_id="scores"
                    )
                    scores_note = gr.Markdown(ui.scores_note())
            gr.Markdown("### Pareto fronts of the shipped sweep")
            with gr.Row():
                figure = ui.pareto_plot(summary) if summary else None
                plot = gr.Plot(figure, label="Pareto fronts", visible=summary is not None, elem_id="pareto", scale=3)
                with gr.Column(scale=2):
                    if summary:
                        gr.Dataframe(ui.front_table(summary), label="HV and MIP per method (higher is better)", interactive=False)
                    gr.Markdown(sweep_note, elem_id="sweep-note")
            last_answer = gr.State(None)

        with gr.Tab("Compare"):
            gr.Markdown("The same prompt at three preferences, generated side by side in one batch (weights are normalised).")
            compare_prompt = gr.Textbox(label="Prompt", lines=2, placeholder="Ask something…")
            with gr.Row():
                compare_preferences = [
                    gr.Textbox(value=value, label=f"preference {n} ({', '.join(objectives)})")
                    for n, value in enumerate(ui.default_compare_preferences(objectives), start=1)
                ]
            compare_run = gr.Button("Compare", variant="primary")
            with gr.Row():
                compare_answers = [
                    gr.Textbox(label=f"answer {n}", lines=10, interactive=False) for n in range(1, ui.COMPARE_COUNT + 1)
                ]
            compare_scores = gr.Dataframe(label="Reward-model scores", interactive=False, visible=False)
            compare_note = gr.Markdown()
            gr.Examples([[p] for p in ui.EXAMPLE_PROMPTS], inputs=[compare_prompt], label="Example prompts")
            last_compare = gr.State(None)

        gr.on(
            [slider.change for slider in sliders],
            _named(show_preference, weight_names),
            inputs=sliders,
            outputs=preference_text,
            api_name="describe_preference",
            concurrency_limit=None,
            trigger_mode="always_last",
        )
        gr.on(
            [run.click, prompt.submit],
            _named(generate, ["prompt", *weight_names, *SETTINGS]),
            inputs=[prompt, *sliders, *settings],
            outputs=[answer, last_answer],
            api_name="generate",
            concurrency_id="model",
            concurrency_limit=ui.max_batch(),
        ).success(generate_details, last_answer, [gate, scores, plot, scores_note], api_name="generate_details")
        gr.on(
            [compare_run.click, compare_prompt.submit],
            _named(compare, ["prompt", *(f"preference_{n}" for n in range(1, ui.COMPARE_COUNT + 1)), *SETTINGS]),
            inputs=[compare_prompt, *compare_preferences, *settings],
            outputs=[*compare_answers, last_compare],
            api_name="compare",
            concurrency_id="model",
            concurrency_limit=ui.max_batch(),
        ).success(compare_details, last_compare, [compare_scores, compare_note], api_name="compare_details")

    return demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Start the paretoalign web app (offline: the default backbone and checkpoint).")
    parser.add_argument("--host", default=None, help="address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (needs the network)")
    parser.add_argument(
        "--max-batch", type=int, default=ui.max_batch(),
        help=f"answers that users waiting at the same time share one decoding batch with (default {ui.max_batch()}; 1: one at a time)",
    )
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES],
        help="backbone precision (auto: bf16 on a GPU, fp32 on a CPU; bfloat16 decodes faster on CPUs with bf16 instructions)",
    )
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        parser.error(f"--max-batch must be at least 1, got {args.max_batch}")
    ui.set_max_batch(args.max_batch)
    ui.set_dtype(args.dtype)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("paretoalign").setLevel(logging.INFO)
    ui.ensure_offline_backbone()
    ui.get_model()  # load once, before the first request
    ui.get_scorer()
    build_demo().launch(server_name=args.host, server_port=args.port, share=True if args.share else None)


if __name__ == "__main__":
    main()
