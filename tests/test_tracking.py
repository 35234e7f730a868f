"""The tracker's sender thread: calls in order, merged metric batches, one warning per
outage, every queued call delivered once the tracker answers again, and a bounded wait."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import TINY
from launcher.tracking import Sender


class Flaky:
    """A tracker endpoint that refuses connections while `down` is set."""

    def __init__(self):
        self.down = threading.Event()
        self.batches: list[list] = []
        self.calls: list[str] = []

    def metrics(self, values):
        if self.down.is_set():
            raise ConnectionRefusedError(111, "Connection refused")
        self.batches.append(list(values))

    def call(self, name):
        def fn():
            if self.down.is_set():
                raise ConnectionRefusedError(111, "Connection refused")
            self.calls.append(name)
        return fn


def test_outage_queues_in_order_warns_once_and_delivers_everything():
    server, lines = Flaky(), []
    sender = Sender("test server", server.metrics, max_backoff_s=0.2, say=lines.append)
    sender.put_metrics([1, 2])
    assert sender.drain(5)
    server.down.set()
    for step in range(3, 40):
        sender.put_metrics([step])
    sender.put_call("params", server.call("params"))
    sender.put_metrics([40])
    time.sleep(1.0)  # several retries while down
    assert not sender.drain(0.3)
    assert [x for x in lines if "not answering" in x] == [lines[0]] and len(lines) == 1
    server.down.clear()
    assert sender.drain(10)
    sender.close()
    sent = [v for b in server.batches for v in b]
    assert sent == list(range(1, 41))  # nothing lost, nothing twice, in order
    assert server.calls == ["params"]
    # metrics queued before the call went in one merged batch, before it; the rest after it
    assert [3, 4, 5] == server.batches[1][:3] and server.batches[-1] == [40]
    assert any("answers again" in x for x in lines) and len(lines) == 2


def test_refused_call_is_dropped_with_a_warning_and_the_rest_goes_on():
    class Refused(Exception):
        error_code = "INVALID_PARAMETER_VALUE"

    got, lines = [], []

    def bad():
        raise Refused("param changed")

    sender = Sender("test server", got.extend, say=lines.append)
    sender.put_call("params", bad)
    sender.put_metrics([1])
    assert sender.drain(5)
    sender.close()
    assert got == [1] and len(lines) == 1 and "refused params" in lines[0]


def test_drain_gives_up_at_its_deadline_and_close_stops_the_thread():
    server, lines = Flaky(), []
    server.down.set()
    sender = Sender("test server", server.metrics, max_backoff_s=0.1, say=lines.append)
    sender.put_metrics([1])
    t = time.monotonic()
    assert not sender.drain(0.5)
    assert time.monotonic() - t < 10  # the server stays down: without the deadline this never returns
    sender.close()
    sender.thread.join(5)
    assert not sender.thread.is_alive() and server.batches == []


def test_a_busy_server_is_reachable_a_closed_port_is_not(tmp_path):
    """Connecting is one deadline, the answer another: a server that accepts the connection
    and answers 2 s later passes a 1 s connect deadline (a team's server under load); a
    closed port fails at once with one line."""
    import socket
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from launcher.config import load_config
    from launcher.errors import ConfigError
    from launcher.tracking import Setup, check_reachable

    answered = threading.Event()

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(2.0)
            answered.set()  # before the answer leaves, so the client cannot see it first
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = load_config(str(TINY), [f"tracking.uri=http://127.0.0.1:{server.server_address[1]}"], output_dir=str(tmp_path))
        check_reachable(Setup.of(cfg), timeout_s=1.0)
        assert answered.is_set()  # it waited past the 1 s connect deadline for the answer
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cfg = load_config(str(TINY), [f"tracking.uri=http://127.0.0.1:{closed}"], output_dir=str(tmp_path))
    # Refused, not timed out: the connection attempt's own answer, not the deadline's.
    with pytest.raises(ConfigError, match=rf"tracking.uri: http://127.0.0.1:{closed} does not answer \(Connection refused\)"):
        check_reachable(Setup.of(cfg), timeout_s=1.0)
