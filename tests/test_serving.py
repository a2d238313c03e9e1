"""The batch server: requests that wait together decode as one batch, each gets the answers it would get alone."""

import threading
import time

import pytest

from paretoalign import ui
from paretoalign.serving import BatchServer

NAMES = ["helpfulness", "harmlessness"]


def request(prompt="Hi", preferences=((0.5, 0.5),), temperature=0.0, max_new_tokens=6, seed=0, method="dualhead"):
    return ui.make_request(prompt, [list(p) for p in preferences], 2.0, temperature, max_new_tokens, seed, method, NAMES, ["dualhead", "base"])


def texts(answers):
    return [(answer.text, answer.token_ids) for answer in answers]


class HeldModel:
    """A model getter that holds the first batch until ``waiting`` more requests are queued, so they form one batch."""

    def __init__(self, model, server_box, waiting):
        self.model, self.server_box, self.waiting, self.calls = model, server_box, waiting, 0

    def __call__(self):
        self.calls += 1
        if self.calls == 1:
            deadline = time.monotonic() + 60
            while self.server_box[0]._waiting.qsize() < self.waiting:
                assert time.monotonic() < deadline, "the other requests never arrived"
                time.sleep(0.01)
        return self.model


def run_concurrently(server, requests):
    results, errors = [None] * len(requests), []

    def work(i):
        try:
            *_, last = server.stream(requests[i])
            results[i] = last
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
        time.sleep(0.02)  # arrival order = list order
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return results


def test_waiting_requests_share_a_batch_and_get_the_answers_they_would_get_alone(make_model):
    model = make_model()
    first = request("Warm up")
    others = [
        request("How do I bake bread?", [(1, 0), (0, 1)]),
        request("Tell me a joke.", temperature=0.0, max_new_tokens=3),
        request("Name a colour.", [(0.2, 0.8)], max_new_tokens=9),
    ]
    sampled = [request("Write a poem.", temperature=0.8, seed=7), request("Write a song.", temperature=0.8, seed=3)]
    box = [None]
    server = BatchServer(HeldModel(model, box, len(others) + len(sampled)), max_rows=16, gather_seconds=0)
    box[0] = server
    results = run_concurrently(server, [first, *others, *sampled])
    # the first request decoded alone; the greedy ones together (4 rows); the sampled ones (another temperature) together
    assert list(server.batches) == [1, 4, 2]
    for req, answers in zip([first, *others, *sampled], results):
        *_, alone = ui.stream_answers(req, model)
        assert texts(answers) == texts(alone)
        assert len(answers) == len(req.preferences)
        assert all(len(answer.token_ids) <= req.max_new_tokens for answer in answers)


def test_max_rows_caps_a_batch_and_one_serves_requests_in_order(make_model):
    model = make_model()
    box = [None]
    server = BatchServer(HeldModel(model, box, 3), max_rows=3, gather_seconds=0)
    box[0] = server
    run_concurrently(server, [request("a"), request("b", [(1, 0), (0, 1)]), request("c", [(1, 0), (0, 1)]), request("d")])
    assert list(server.batches) == [1, 3, 2]  # b with d (c would make 4 rows), then c
    box = [None]
    one = BatchServer(HeldModel(model, box, 2), max_rows=1)
    box[0] = one
    run_concurrently(one, [request("a"), request("b"), request("c")])
    assert list(one.batches) == [1, 1, 1]
    with pytest.raises(ValueError, match="max_rows must be a positive integer, got 0"):
        BatchServer(lambda: model, max_rows=0)


def test_a_user_who_leaves_and_a_failing_batch_do_not_stop_the_server(make_model):
    model = make_model()
    server = BatchServer(lambda: model, max_rows=8)
    stream = server.stream(request("Leaving early", max_new_tokens=20))
    next(stream)
    stream.close()  # the user left after the first token
    unknown = ui.Request("Hi", [[0.5, 0.5]], NAMES, 2.0, 0.0, 4, 0, "no-such-method")  # past the app's checks
    with pytest.raises(Exception, match="no-such-method"):
        list(server.stream(unknown))
    *_, answers = server.stream(request("Still here?"))
    *_, alone = ui.stream_answers(request("Still here?"), model)
    assert texts(answers) == texts(alone)


def test_the_app_serves_through_one_shared_server(make_model):
    model = make_model()
    ui.set_model(model)
    try:
        ui.set_max_batch(4)
        assert ui.batch_server().max_rows == 4 and ui.batch_server() is ui.batch_server()
        *_, answers = ui.serve_answers(request("Hello there", [(1, 0), (0, 1)]))
        *_, alone = ui.stream_answers(request("Hello there", [(1, 0), (0, 1)]), model)
        assert texts(answers) == texts(alone)
        with pytest.raises(ValueError, match="max batch must be a positive integer"):
            ui.set_max_batch(0)
    finally:
        ui.set_max_batch(16)
        ui.set_model(None)


def test_a_request_that_fails_alone_does_not_fail_its_batch(make_model):
    model = make_model()
    box = [None]
    server = BatchServer(HeldModel(model, box, 2), max_rows=8, gather_seconds=0)
    box[0] = server
    bad = ui.Request("Bad seed", [[0.5, 0.5]], NAMES, 2.0, 0.0, 4, 2**64, "dualhead")  # past the app's checks
    results, errors = {}, {}

    def work(name, req):
        try:
            *_, results[name] = server.stream(req)
        except Exception as error:  # noqa: BLE001
            errors[name] = error

    threads = [threading.Thread(target=work, args=args) for args in (("first", request("Warm up")), ("bad", bad), ("good", request("Fine")))]
    for thread in threads:
        thread.start()
        time.sleep(0.02)
    for thread in threads:
        thread.join(timeout=120)
    assert set(errors) == {"bad"} and set(results) == {"first", "good"}
    *_, alone = ui.stream_answers(request("Fine"), model)
    assert texts(results["good"]) == texts(alone)
    with pytest.raises(ValueError, match="seed must be a whole number from 0 to"):
        request(seed=2**64)
