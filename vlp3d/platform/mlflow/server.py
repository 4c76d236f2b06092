"""Is the tracking server there, and does it take this client's credentials? One request without
retries, answered in seconds: an unreachable server or a refused login is one line naming the host
(never the credentials), not minutes of MLflow's retry warnings or metrics silently dropped."""

from __future__ import annotations

from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 10  # connect and read, each; MLflow's own default is 120 s with 7 retries
REFUSED = (401, 403)
_answered: set[str] = set()  # URIs that answered this process's probe (probed once per process)


class TrackingServerError(ConnectionError):
    """The MLflow tracking server cannot be reached, or refuses this client's credentials."""


def host_of(uri: str) -> str:
    """`https://user:pw@mlflow.example:5000/prefix` -> `https://mlflow.example:5000`: where, without secrets."""
    parts = urlsplit(uri)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def probe(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> int | str:
    """The HTTP status of one authenticated request to the server (search one experiment, MLflow's
    credentials from the environment or the URI), or why no answer came ("connection refused", ...)."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "POST",
                                max_retries=0, timeout=timeout_s, json={"max_results": 1}, raise_on_status=False)
    except Exception as err:  # noqa: BLE001 - every way of not answering is a reason
        return _why(err, timeout_s)
    return int(response.status_code)


def refused_message(where: str, status: int) -> str:
    what = ("HTTP 401: no credentials, or wrong ones" if status == 401
            else "HTTP 403: the account has no permission for this")
    return (f"MLflow tracking server {where} refused this client ({what}). Set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account of that server with access to the "
            "experiment; with `vlp3d submit`, pass them with --env NAME (values are never shown).")


def check_server(uri: str) -> None:
    """Raise TrackingServerError (one line, host only) unless the server at `uri` answers and accepts
    this client; a local store (sqlite, file) passes. Probed once per process and URI."""
    if not is_server(uri) or uri in _answered:
        return
    answer = probe(uri, PROBE_TIMEOUT_S)
    where = host_of(uri)
    if isinstance(answer, int) and answer >= 500:  # a proxy without its server: MLflow would retry for minutes
        answer = f"it answered HTTP {answer}"
    if isinstance(answer, str):
        raise TrackingServerError(
            f"MLflow tracking server {where} is unreachable ({answer}). Start it, or point tracking.tracking_uri "
            "/ $MLFLOW_TRACKING_URI at a server this machine reaches (on a cluster: the head's private address, "
            "docs/cluster.md).")
    if answer in REFUSED:
        raise TrackingServerError(refused_message(where, answer))
    _answered.add(uri)


def _why(err: BaseException, timeout_s: float) -> str:
    """A short reason from the chain of exceptions that requests and MLflow raise."""
    import socket

    import requests

    seen = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    for cause in seen:
        if isinstance(cause, requests.exceptions.Timeout | socket.timeout | TimeoutError):
            return f"no answer within {timeout_s:g} s"
        if isinstance(cause, requests.exceptions.SSLError):
            return "TLS handshake failed"
    text = " ".join(str(e) for e in seen)
    if "Name or service not known" in text or "nodename nor servname" in text or "NameResolution" in text \
            or "getaddrinfo failed" in text or "Temporary failure in name resolution" in text:
        return "host name not found"
    if "Connection refused" in text or "ConnectionRefused" in text:
        return "connection refused"
    if "timed out" in text or "Timeout" in text:
        return f"no answer within {timeout_s:g} s"
    return type(seen[-1]).__name__
