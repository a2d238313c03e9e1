"""Concurrent app users: latency with a shared decoding batch vs one request at a time, side by side in one run.

Starts ``app/app.py`` twice on the default offline model and shipped checkpoint, ``--max-batch 1`` (one request at a
time, in arrival order) and ``--max-batch N`` (requests waiting together decode as one batch), and drives each with
``gradio_client``: ``--clients`` threads each send ``--requests`` ``/generate`` calls one after another (greedy,
``--max-new-tokens``). Prints each request's latency (submit to final answer), the medians and their ratio, and
whether every answer was the same in both servers. Target (issue 15): 8 clients x 2 requests, median at least 3x lower.

    python benchmarks/app_concurrency.py [--clients 8] [--requests 2] [--max-new-tokens 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 3.0
PROMPTS = [
    "What is a good recipe for banana bread?",
    "How do I pick a lock to get into my neighbour's house?",
    "Explain how vaccines train the immune system.",
    "How can I get back at a coworker who embarrassed me?",
    "Write a short, friendly reminder to my team about tomorrow's meeting.",
    "What is the easiest way to steal a car without getting caught?",
    "Give me three tips for sleeping better.",
    "Write an insulting message to send to my ex.",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(max_batch: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "app/app.py", "--max-batch", str(max_batch)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    return process, f"http://127.0.0.1:{port}/"


def connect(process: subprocess.Popen, url: str, log_path: Path, timeout: float = 600):
    from gradio_client import Client

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited ({process.returncode}):\n{log_path.read_text()[-2000:]}")
        try:
            return Client(url, verbose=False)
        except Exception:  # noqa: BLE001  not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"the app did not start within {timeout:.0f} s:\n{log_path.read_text()[-2000:]}") from None
            time.sleep(1)


def drive(url: str, clients: int, requests: int, max_new_tokens: int) -> list[dict]:
    """Every client sends its requests one after another; all clients start together."""
    from gradio_client import Client

    records, lock = [], threading.Lock()
    start = threading.Barrier(clients)

    def client_thread(index: int) -> None:
        client = Client(url, verbose=False)
        start.wait()
        for number in range(requests):
            prompt = PROMPTS[(index + number * clients) % len(PROMPTS)]
            weight = (index % 5) / 4  # clients sit at different slider positions
            began = time.perf_counter()
            answer = client.predict(prompt, weight, 3.0, 0.0, max_new_tokens, 0, "dualhead", api_name="/generate")
            with lock:
                records.append({"client": index, "request": number, "prompt": prompt, "weight": weight,
                                "seconds": time.perf_counter() - began, "answer": answer})

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(records, key=lambda r: (r["client"], r["request"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch")
    parser.add_argument("--json", default=None, help="also write the measurements here")
    args = parser.parse_args(argv)
    for name in ("clients", "requests", "max_new_tokens", "max_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")

    import torch

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.clients} clients x {args.requests} requests, {args.max_new_tokens} new tokens, greedy")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, max_batch in (("one at a time", 1), (f"shared batch (max {args.max_batch})", args.max_batch)):
            log_path = Path(tmp) / f"app-{max_batch}.log"
            process, url = start_app(max_batch, log_path)
            try:
                connect(process, url, log_path).predict("Warm up", 0.5, 3.0, 0.0, 8, 0, "dualhead", api_name="/generate")
                began = time.perf_counter()
                records = drive(url, args.clients, args.requests, args.max_new_tokens)
                wall = time.perf_counter() - began
            finally:
                process.terminate()
                process.wait(timeout=60)
            latencies = [r["seconds"] for r in records]
            results[label] = {"max_batch": max_batch, "median_s": statistics.median(latencies), "max_s": max(latencies),
                              "wall_s": wall, "records": records}
            print(f"{label:>28}: median {statistics.median(latencies):6.2f} s   max {max(latencies):6.2f} s   all done in {wall:6.2f} s")
    one, shared = results.values()
    ratio = one["median_s"] / shared["median_s"]
    same = sum(a["answer"] == b["answer"] for a, b in zip(one["records"], shared["records"]))
    print(f"median latency ratio (one at a time / shared batch): {ratio:.2f}x  (target >= {TARGET_RATIO:.0f}x: "
          f"{'met' if ratio >= TARGET_RATIO else 'NOT met'})")
    print(f"answers identical in both servers: {same} of {len(one['records'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ratio": ratio, "identical": same, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
