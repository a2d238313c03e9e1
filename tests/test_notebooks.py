"""The notebooks are stored without outputs and run top to bottom on the tiny model with small settings."""

import gzip
import json
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

from paretoalign.data import DATA_DIR

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
KERNEL_NAME = "paretoalign-tests"
HH_FILES = ("helpful-base", "helpful-online", "helpful-rejection-sampled", "harmless-base")


def test_the_three_notebooks_exist():
    assert [path.name for path in NOTEBOOKS] == ["01_pareto_front.ipynb", "02_gate_dynamics.ipynb", "03_training.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {index} has outputs; clear them before committing"
            assert cell.execution_count is None, f"{path.name}: cell {index} has an execution count"
        assert "execution" not in cell.metadata, f"{path.name}: cell {index} has execution timing metadata"
    assert "widgets" not in notebook.metadata


@pytest.fixture(scope="module")
def kernel_environment(tmp_path_factory):
    """A kernelspec that runs this interpreter (no network, no user-level Jupyter set-up) and small data."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "paretoalign tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    data = root / "data"
    (data / "hh-rlhf").mkdir(parents=True)
    for name in HH_FILES:  # the first 32 real pairs of each vendored file: enough for every split
        with gzip.open(DATA_DIR / "hh-rlhf" / f"{name}.jsonl.gz", "rt") as source:
            lines = [next(source) for _ in range(32)]
        with gzip.open(data / "hh-rlhf" / f"{name}.jsonl.gz", "wt") as target:
            target.writelines(lines)
    (data / "pku-saferlhf").mkdir()
    records = json.loads((DATA_DIR / "pku-saferlhf" / "safer-pairs.json").read_text())[:32]
    (data / "pku-saferlhf" / "safer-pairs.json").write_text(json.dumps(records))
    return root


SMALL_SETTINGS = {
    "01_pareto_front": {
        "PARETOALIGN_NB_PROMPT_SOURCE": "builtin",
        "PARETOALIGN_NB_PROMPTS": "3",
        "PARETOALIGN_NB_GRID": "3",
        "PARETOALIGN_NB_MAX_NEW_TOKENS": "4",
        "PARETOALIGN_NB_SCORER": "heuristic",
    },
    "02_gate_dynamics": {"PARETOALIGN_NB_GRID": "3", "PARETOALIGN_NB_MAX_NEW_TOKENS": "6"},
    "03_training": {"PARETOALIGN_NB_PAIRS": "4", "PARETOALIGN_NB_GRID": "3", "PARETOALIGN_NB_FALLBACK_STEPS": "6"},
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom(path, kernel_environment, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_environment))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # no user profile or startup files in the kernel
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' temporary folders are cleaned up with the test's
    monkeypatch.setenv("PLOTLY_RENDERER", "json")  # small outputs: no plotly.js embedded in every figure
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PARETOALIGN_NB_MODEL", "tiny")
    monkeypatch.setenv("PARETOALIGN_NB_DATA_DIR", str(kernel_environment / "data"))
    monkeypatch.setenv("PARETOALIGN_NB_SWEEP_DIR", str(tmp_path / "sweep"))
    monkeypatch.setenv("PARETOALIGN_NB_SHIPPED_SWEEP", str(tmp_path / "no-shipped-sweep"))
    monkeypatch.setenv("PARETOALIGN_NB_TRAINING_LOG", str(tmp_path / "no-run" / "training_log.jsonl"))
    for name, value in SMALL_SETTINGS[path.stem].items():
        monkeypatch.setenv(name, value)

    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, kernel_name=KERNEL_NAME, timeout=120, resources={"metadata": {"path": str(NOTEBOOKS_DIR)}}
    )
    client.execute()  # raises CellExecutionError naming the cell on the first failing one

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    printed = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    figures = [
        output for output in outputs if {"application/vnd.plotly.v1+json", "application/json"} & set(output.get("data", {}))
    ]
    assert figures, f"{path.name} drew no plotly figure"
    if path.stem == "03_training":
        # The missing log is reported, a tiny run stands in, and its heads are measured.
        assert "no training log" in printed and "the tiny stand-in run's heads" in printed
    else:
        assert "tiny random model" in printed
    if path.stem == "01_pareto_front":
        assert "no shipped sweep results" in printed and (tmp_path / "sweep" / "results.jsonl").is_file()
