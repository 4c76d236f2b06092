"""`RankZeroLogger`: the rank-0 training worker's metrics, params and texts, sent by a background thread."""

from __future__ import annotations

import os

import mlflow
from mlflow.tracking import MlflowClient

from vlp3d.platform.mlflow.server import (
    REFUSED,
    TrackingServerError,
    is_server,
    probe,
    refused_message,
)
from vlp3d.redact import redact

# error codes of a server that answered and rejected a call (a retry cannot succeed: it is dropped)
_REJECTED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
             "INVALID_STATE"}


class RankZeroLogger:
    """Metrics, params and texts from the rank-0 training worker into an existing run, sent by a
    background thread so that training never waits on MLflow. While the server is unreachable
    everything is kept in order and retried with backoff (one warning when it goes away, one
    line when it is back); `flush` waits a bounded time, and what is still unsent can be saved
    with a checkpoint (`pending`) and re-queued by the next rank 0 (`requeue`).

    A server that refuses the credentials (HTTP 401/403) stops the run instead: at the start (one
    probe) and at any later call, training's next logging call raises `TrackingServerError`, and
    nothing is dropped (what was refused stays in `pending`)."""

    def __init__(self, tracking_uri_: str, run_id: str, request_timeout_s: int = 10, warn=print):
        import queue
        import threading

        # bounded single requests: the thread retries itself (MLflow's defaults wait minutes)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(request_timeout_s))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        self.client = MlflowClient(tracking_uri=tracking_uri_)
        self.run_id = run_id
        self._where = redact(tracking_uri_)
        self._warn = warn
        self.refused = ""  # the refusal that stops the run, once the server has refused this client
        if is_server(tracking_uri_):  # credentials checked before training starts; an outage is waited out
            answer = probe(tracking_uri_, timeout_s=min(request_timeout_s, 5))
            if answer in REFUSED:
                raise TrackingServerError(refused_message(self._where, answer))
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._sending: list[tuple] = []  # the batch in flight (kept until it is acknowledged)
        self._unsent = 0
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
        self._thread.start()

    # --- what the training loop calls (never blocks on the network) ---------------------------
    def log_params(self, params: dict[str, object]) -> None:
        self._put(("params", {k: str(v) for k, v in params.items()}))
        self._stop_if_refused()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        self._put(("metrics", {"values": {k: float(v) for k, v in metrics.items()}, "step": int(step),
                               "timestamp": int(time.time() * 1000)}))
        self._stop_if_refused()

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put(("text", {"text": text, "artifact_file": artifact_file}))
        self._stop_if_refused()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything queued was sent (True), or `timeout_s` passed or the server refused
        this client (False)."""
        import time

        deadline = time.monotonic() + timeout_s
        while not self.refused:
            if self._idle.wait(min(0.2, max(0.0, deadline - time.monotonic()))):
                return True
            if time.monotonic() >= deadline:
                return False
        return False

    def _stop_if_refused(self) -> None:
        if self.refused:
            raise TrackingServerError(self.refused)

    def pending(self) -> list[tuple]:
        """Everything not yet acknowledged by the server, oldest first (a copy)."""
        with self._lock:
            return list(self._sending) + list(self._queue.queue)

    def requeue(self, items: list) -> None:
        for kind, payload in items:
            self._put((kind, payload))

    # --- the sender thread ----------------------------------------------------------------------
    def _put(self, item: tuple) -> None:
        with self._lock:
            self._idle.clear()
            self._queue.put(item)

    def _run(self) -> None:
        import time

        failing_since, delay = None, 1.0
        while True:
            with self._lock:
                if not self._sending:
                    self._sending = self._take()
                batch = list(self._sending)
                if not batch:
                    self._idle.set()
            if not batch or self.refused:  # refused: kept unsent for the checkpoint, never retried
                time.sleep(0.05)
                continue
            error = self._attempt(batch)
            if self.refused:
                continue  # the batch stays in _sending: pending() hands it to the checkpoint
            if error is not None:  # unreachable, timed out, 5xx: keep the batch, retry with backoff
                if failing_since is None:
                    failing_since = time.time()
                    self._warn(f"MLflow at {self._where} is not answering ({error}); metrics are kept and "
                               "sent when it is back, training goes on", flush=True)
                time.sleep(delay)
                delay = min(30.0, delay * 2)
                continue
            with self._lock:
                self._sending = []
            if failing_since is not None:
                self._warn(f"MLflow at {self._where} is back after {time.time() - failing_since:.0f} s; "
                           "buffered metrics sent", flush=True)
                failing_since, delay = None, 1.0

    def _attempt(self, batch: list[tuple]) -> str | None:
        """Send `batch`: None when done (or rejected by the server: a retry cannot succeed, so it is
        dropped with a warning; or the credentials were refused: it is kept and `refused` is set),
        else the error's name."""
        try:
            self._send(batch)
        except mlflow.exceptions.MlflowException as err:
            if err.get_http_status_code() in REFUSED:
                self.refused = refused_message(self._where, err.get_http_status_code())
                self._warn(self.refused, flush=True)
                return None
            if err.error_code not in _REJECTED:
                return type(err).__name__
            self._warn(redact(f"MLflow refused {len(batch)} logging calls: {err.message}"), flush=True)
        except Exception as err:  # noqa: BLE001 - connection refused, timeouts, ...
            return type(err).__name__
        return None

    def _take(self) -> list[tuple]:
        """Queued items, oldest first, at most 500 metrics per request."""
        items, metrics = [], 0
        while not self._queue.empty() and metrics < 500:
            item = self._queue.get_nowait()
            items.append(item)
            metrics += len(item[1]["values"]) if item[0] == "metrics" else 0
        return items

    def _send(self, items: list[tuple]) -> None:
        metrics, params = [], []
        for kind, payload in items:
            if kind == "metrics":
                metrics += [mlflow.entities.Metric(k, v, payload["timestamp"], payload["step"])
                            for k, v in payload["values"].items()]
            elif kind == "params":
                params += [mlflow.entities.Param(k, v) for k, v in payload.items()]
        if metrics or params:
            self.client.log_batch(self.run_id, metrics=metrics, params=params)
        for kind, payload in items:
            if kind == "text":
                self.client.log_text(self.run_id, payload["text"], payload["artifact_file"])
