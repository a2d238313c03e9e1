"""Fault tests: a sweep and a training run killed with SIGKILL at several points, then rerun, end with exactly the
rows and weights of an uninterrupted run: none lost, none duplicated."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = Path(__file__).resolve().parent / "fault_worker.py"
PROMPTS = ["How do I pick a lock?", "Hi", "Tell me about bread.", "What is the capital of France?", "Say something nice."]


def run(*args) -> None:
    subprocess.run([sys.executable, str(WORKER), *map(str, args)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_and_kill(done, *args, timeout: float = 120) -> bool:
    """Start the worker and SIGKILL it as soon as ``done()`` is true; False if it finished first."""
    process = subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if done():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.01)
    process.wait()
    return False


def result_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def comparable(row: dict) -> tuple:
    return row["method"], tuple(row["preference"] or ()), row["prompt_id"], row["text"], json.dumps(row["scores"], sort_keys=True)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_a_killed_sweep_reruns_to_the_same_rows(prompts, tmp_path):
    run("sweep", tmp_path / "whole", prompts)
    expected = sorted(comparable(row) for row in result_lines(tmp_path / "whole" / "results.jsonl"))
    assert len(expected) == len(PROMPTS) * 6  # five grid points for the Dual-Head, one row for the base model
    for kill_after in (1, 7, 19):  # rows on disk when the process is killed
        out = tmp_path / f"killed-{kill_after}"
        results = out / "results.jsonl"
        killed = run_and_kill(lambda: len(results.read_bytes().splitlines()) >= kill_after if results.is_file() else False,
                              "sweep", out, prompts)
        assert killed, f"the sweep finished before {kill_after} rows were written"
        run("sweep", out, prompts)
        rows = result_lines(results)
        assert sorted(comparable(row) for row in rows) == expected  # none lost, none duplicated


def test_a_killed_training_run_reruns_to_the_same_weights(small_data, tmp_path):
    features = tmp_path / "features"
    run("train", tmp_path / "whole", small_data, features)  # also builds the feature cache the others reuse
    expected = load_file(tmp_path / "whole" / "model" / "dualhead_model.safetensors")
    for kill_at_step in (3, 8):
        out = tmp_path / f"killed-{kill_at_step}"
        log = out / "training_log.jsonl"
        killed = run_and_kill(lambda: len(result_lines_safe(log)) >= kill_at_step, "train", out, small_data, features)
        assert killed, f"training finished before step {kill_at_step}"
        run("train", out, small_data, features)
        weights = load_file(out / "model" / "dualhead_model.safetensors")
        assert weights.keys() == expected.keys()
        for name, tensor in expected.items():
            assert (weights[name] == tensor).all(), name
        steps = [record["step"] for record in result_lines(log)]
        assert steps == sorted(set(steps)) and steps[-1] == 12  # the log holds every step once


def result_lines_safe(path: Path) -> list:
    try:
        return path.read_bytes().splitlines() if path.is_file() else []
    except OSError:
        return []
