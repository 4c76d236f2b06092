"""Tracking-server failures, clear and fast, against local fake servers (no real MLflow server, no Ray):
unreachable or refusing at the start of a command is one line naming the host (never the password),
after a single request; a 401/403 during training stops the run instead of dropping metrics."""

import http.server
import json
import socket
import threading

import pytest

from vlp3d.cli import main
from vlp3d.platform.mlflow import server as tracking_server
from vlp3d.platform.mlflow.logger import RankZeroLogger
from vlp3d.platform.mlflow.server import TrackingServerError

SECRET = "hunter2-tracking"


class FakeMlflow(http.server.BaseHTTPRequestHandler):
    """Answers the probe (experiments/search) with `probe_status` and every other call with `status`;
    records the paths it was asked for."""

    probe_status, status, paths = 200, 200, []

    def _answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).paths.append(self.path)
        status = self.probe_status if self.path.endswith("/experiments/search") else self.status
        body = json.dumps({"experiments": []}).encode() if status == 200 else b"You are not authenticated."
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def fake(monkeypatch):
    """A fresh fake server class (its own statuses and request log) on 127.0.0.1; yields (class, URI with a password)."""
    handler = type("Fake", (FakeMlflow,), {"paths": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setattr(tracking_server, "_answered", set())
    try:
        yield handler, f"http://vlp3d:{SECRET}@127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _evaluate(uri: str, tmp_path) -> int:
    return main(["evaluate", "--model", "models:/vlp3d-clip/1", "--shards", str(tmp_path), "--tracking-uri", uri])


def _errors(stderr: str) -> str:
    """stderr without the info line saying which store the command reads (`MLflow store: URI (why)`)."""
    return "".join(line for line in stderr.splitlines(keepends=True) if not line.startswith("MLflow store: "))


def test_an_unreachable_server_is_one_line_naming_the_host(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tracking_server, "_answered", set())
    port = _closed_port()
    assert _evaluate(f"http://vlp3d:{SECRET}@127.0.0.1:{port}", tmp_path) == 2
    err = _errors(capsys.readouterr().err)
    assert err == (f"error: MLflow tracking server http://127.0.0.1:{port} is unreachable (connection refused). "
                   "Start it, or point tracking.tracking_uri / $MLFLOW_TRACKING_URI at a server this machine "
                   "reaches (on a cluster: the head's private address, docs/cluster.md).\n")


def test_a_server_that_does_not_answer_is_one_request_and_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tracking_server, "_answered", set())
    monkeypatch.setattr(tracking_server, "PROBE_TIMEOUT_S", 1)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        assert _evaluate(f"http://vlp3d:{SECRET}@127.0.0.1:{silent.getsockname()[1]}", tmp_path) == 2
    err = _errors(capsys.readouterr().err)
    assert "is unreachable (no answer within 1 s)" in err and SECRET not in err and err.count("\n") == 1


def test_a_proxy_without_its_server_is_asked_once(fake, tmp_path, capsys):
    handler, uri = fake
    handler.probe_status = 503  # MLflow retries 503 seven times with backoff by default
    assert _evaluate(uri, tmp_path) == 2
    assert "is unreachable (it answered HTTP 503)" in capsys.readouterr().err
    assert handler.paths == ["/api/2.0/mlflow/experiments/search"]


@pytest.mark.parametrize("status, what", [(401, "HTTP 401: no credentials, or wrong ones"),
                                          (403, "HTTP 403: the account has no permission")])
def test_refused_credentials_at_the_start_are_one_line_with_what_to_set(fake, tmp_path, capsys, status, what):
    handler, uri = fake
    handler.probe_status = status
    assert _evaluate(uri, tmp_path) == 2
    err = _errors(capsys.readouterr().err)
    host = uri.replace(f"vlp3d:{SECRET}@", "")
    assert err.startswith(f"error: MLflow tracking server {host} refused this client ({what}")
    assert "MLFLOW_TRACKING_USERNAME" in err and SECRET not in err and err.count("\n") == 1
    # the rank-0 logger checks too, before training starts
    with pytest.raises(TrackingServerError, match=r"refused this client \(HTTP 40"):
        RankZeroLogger(uri, "run-1", warn=lambda *a, **k: None)


def test_a_refusal_during_training_stops_the_run_and_loses_nothing(fake):
    handler, uri = fake
    warnings = []
    logger = RankZeroLogger(uri, "run-1", warn=lambda message, **_: warnings.append(message))
    handler.status = 401  # e.g. the password was rotated mid-run
    logger.log_metrics({"train/loss": 1.0}, step=1)
    assert not logger.flush(10)  # returns as soon as the server refused, not after the timeout
    with pytest.raises(TrackingServerError, match=r"refused this client \(HTTP 401"):
        logger.log_metrics({"train/loss": 0.9}, step=2)
    assert [payload["step"] for kind, payload in logger.pending()] == [1, 2]  # kept for the checkpoint
    sent = [p for p in handler.paths if p.endswith("/runs/log-batch")]
    assert len(sent) == 1  # refused once, never retried
    assert len(warnings) == 1 and "refused this client" in warnings[0] and SECRET not in warnings[0]


def test_a_refusal_inside_ray_trains_error_becomes_the_one_line_error():
    from ray.train.v2.api.exceptions import WorkerGroupError

    from vlp3d.platform.launch import tracking_refusal
    from vlp3d.platform.mlflow.server import refused_message

    message = refused_message("http://10.0.0.5:5000", 403)
    wrapped = WorkerGroupError("Training failed due to worker errors", {0: RuntimeError(f"Traceback ...\n{message!r}")})
    assert str(tracking_refusal(wrapped)) == message
    assert tracking_refusal(WorkerGroupError("Training failed", {1: ValueError("nan")})) is None
