"""What may be shown or stored of a text that can hold secrets or patient data: `redact` removes
credentials (every line vlp3d prints or logs and every MLflow tag passes through it), `scrub` also
removes file paths and DICOM UIDs (what a failure reason may say in MLflow).

One module, no imports from vlp3d: the config, storage, logging and platform layers all use it.
The forms it knows are listed (and tested, one row each) in tests/unit/test_redact.py.
"""

from __future__ import annotations

import re

MASK = "***"

# user-info of a URI: everything between `scheme://` and the LAST `@` before the path, query or
# fragment, so that a password holding `@` or `:` goes entirely (`https://u:p@ss@host/x` -> `https://host/x`)
_USERINFO = re.compile(r"(?P<scheme>\b(?P<name>[A-Za-z][A-Za-z0-9+.-]*)://)(?P<userinfo>[^\s/?#@'\"<>]*(?:@[^\s/?#@'\"<>]*)*)@")
# Azure's `abfss://container@account.dfs.core.windows.net/` names the container there: a location
_CONTAINER_SCHEMES = {"abfs", "abfss", "wasb", "wasbs"}


def _drop_userinfo(match: re.Match) -> str:
    container = match.group("name").lower() in _CONTAINER_SCHEMES and ":" not in match.group("userinfo")
    return match.group(0) if container else match.group("scheme")

# query-string parameters whose value is a credential: pre-signed URLs of S3 (SigV4 and V2), GCS
# (V4 and V2), Azure SAS, and the usual token parameters
_SECRET_PARAMS = (
    "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "AWSAccessKeyId", "Signature",
    "X-Goog-Signature", "X-Goog-Credential", "GoogleAccessId",
    "sig", "skoid", "sktid", "skv", "sks", "ske", "skt",
    "token", "access_token", "id_token", "refresh_token", "auth_token", "api_key", "apikey", "api-key", "key",
    "secret", "client_secret", "password", "passwd", "pwd", "code", "session_token", "x-api-key",
)
_QUERY = re.compile(r"(?P<lead>[?&;](?:" + "|".join(map(re.escape, _SECRET_PARAMS)) + r")=)[^&#\s'\"<>]*",
                    re.IGNORECASE)

# NAME=value / NAME: value where NAME says it holds a secret (environment variables in error text,
# `password: ...` in a config dump, `"aws_secret_access_key": "..."` in JSON); names of counts,
# paths and modes that merely mention one (data.max_tokens, RAY_AUTH_TOKEN_PATH) keep their value
_SECRET_NAME = (r"[A-Za-z0-9_.-]*(?:secret|token|password|passwd|passphrase|credential|api_?key|access_?key"
                r"|private_?key|authorization|(?<![a-z])key(?![a-z]))[A-Za-z0-9_.-]*")
_NOT_SECRET_SUFFIXES = ("tokens", "_path", "_file", "_mode", "_dir", "_env")
_ASSIGNED = re.compile(
    r"(?P<lead>(?P<quote>[\"']?)\b(?P<name>" + _SECRET_NAME + r")(?P=quote)\s*(?:=|:(?!//))\s*)"
    r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s,;&'\"}\]]+)", re.IGNORECASE)


def _mask_assigned(match: re.Match) -> str:
    if match.group("name").lower().endswith(_NOT_SECRET_SUFFIXES):
        return match.group(0)
    value = match.group("value")
    return match.group("lead") + (value[0] + MASK + value[0] if value[:1] in "\"'" else MASK)


# credentials after an authorization scheme, and key shapes recognisable on their own
_AUTH_SCHEME = re.compile(r"\b(?P<lead>(?:Bearer|Basic|Token)\s+)(?P<value>[A-Za-z0-9._~+/=-]{8,})", re.IGNORECASE)


def _mask_auth(match: re.Match) -> str:
    """A credential has a digit, a symbol, mixed case inside or length: "Basic authentication." and
    "Token authentication is enabled" are words and stay."""
    core = match.group("value").rstrip(".,;:")
    word = core.isalpha() and len(core) < 24 and (core[1:].islower() or core.isupper())
    return match.group(0) if word else match.group("lead") + MASK


_KEY_SHAPES = re.compile(
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key ids
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}\b|\bgithub_pat_[A-Za-z0-9_]{30,}\b"  # GitHub tokens
    r"|\bAIza[0-9A-Za-z_-]{35}\b"  # Google API keys
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}\b"  # Slack tokens
    r"|\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+"  # JSON web tokens
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",  # PEM private keys
    re.DOTALL)


def redact(text: object) -> str:
    """`text` (anything, as `str`) without credentials: URI user-info removed (`https://u:p@host/x`
    -> `https://host/x`), and `***` for the values of pre-signed URL signatures and token query
    parameters, of `SECRET_NAME=value` assignments, of `Bearer ...` headers and of recognisable
    key shapes (AWS key ids, GitHub/Slack/Google tokens, JWTs, PEM private keys). Hosts, buckets,
    paths and every other parameter stay, so that the message still says where."""
    text = str(text)
    text = _KEY_SHAPES.sub(MASK, text)
    text = _USERINFO.sub(_drop_userinfo, text)
    text = _QUERY.sub(rf"\g<lead>{MASK}", text)
    text = _AUTH_SCHEME.sub(_mask_auth, text)
    return _ASSIGNED.sub(_mask_assigned, text)


# an absolute path (POSIX, Windows or UNC), not a URL's path
_PATH = re.compile(r"(?<![\w:/.\\])(?:[A-Za-z]:)?[/\\][^\s'\",;()\[\]]+")
# a DICOM UID: a root arc 0-2 and at least four more numeric components (1.2.840.113619.2.55...)
_DICOM_UID = re.compile(r"(?<![\w.])[0-2](?:\.\d+){4,}(?![\w.])")


def scrub(text: object, *known: object, mark: str = "<file>") -> str:
    """`redact(text)` and also without patient identifiers that error text carries: each of the
    `known` values (e.g. a row's path and volume name) -> `mark`, any absolute path -> `<path>`,
    any DICOM UID -> `<uid>`. What a failure reason or error may say in MLflow."""
    text = redact(text)
    for value in sorted({str(v) for v in known if v not in (None, "", "None")}, key=len, reverse=True):
        text = text.replace(value, mark)
    return _DICOM_UID.sub("<uid>", _PATH.sub("<path>", text))
