"""The one redaction function (`vlp3d.redact.redact`) against every form of credential a location or an
error text carries, and `scrub` (what a failure reason may say in MLflow) against patient identifiers."""

import pytest

from vlp3d.redact import redact, scrub

# (text, what must disappear, what must stay)
FORMS = [
    # URI user-info, `@` and `:` inside the password included
    ("https://user:secret@mlflow.example/x", ["user", "secret"], ["https://mlflow.example/x"]),
    ("https://user:p@ss@host/x", ["p@ss", "user:", "ss@"], ["https://host/x"]),
    ("https://user:p:a:ss@host:5000/x", ["p:a:ss", "user"], ["https://host:5000/x"]),
    ("https://u%40corp:p%3Ass@host/x", ["u%40corp", "p%3Ass"], ["https://host/x"]),
    ("http://vlp3d:hunter2@127.0.0.1:5000", ["hunter2", "vlp3d:"], ["http://127.0.0.1:5000"]),
    ("ray://me:pw@head:10001", ["me:pw"], ["ray://head:10001"]),
    ("s3://AKIDEXAMPLE:wJalrXUtnFEMI@bucket/shards", ["AKIDEXAMPLE", "wJalrXUtnFEMI"], ["s3://bucket/shards"]),
    ("postgresql://mlflow:db-pa55@db.internal:5432/mlflow", ["db-pa55"], ["postgresql://db.internal:5432/mlflow"]),
    ("https://token@host/repo.git", ["token@"], ["https://host/repo.git"]),
    # pre-signed S3 (SigV4 and V2)
    ("https://bucket.s3.amazonaws.com/shards/a.parquet?X-Amz-Algorithm=AWS4-HMAC-SHA256"
     "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20240101T000000Z"
     "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=fe5f80f77d5fa3beca038a248ff027",
     ["AKIAIOSFODNN7EXAMPLE", "fe5f80f77d5fa3beca038a248ff027", "aws4_request"],
     ["bucket.s3.amazonaws.com/shards/a.parquet", "X-Amz-Expires=3600"]),
    ("https://b.s3.amazonaws.com/k?X-Amz-Security-Token=IQoJb3JpZ2luX2VjEJr%2F%2F&X-Amz-Signature=abc123",
     ["IQoJb3JpZ2luX2VjEJr", "abc123"], ["b.s3.amazonaws.com/k"]),
    ("https://bucket.s3.amazonaws.com/obj?AWSAccessKeyId=AKIDX&Expires=1700000000&Signature=vjbyPxybdZ%2BBrLw%3D",
     ["AKIDX", "vjbyPxybdZ"], ["bucket.s3.amazonaws.com/obj", "Expires=1700000000"]),
    # pre-signed GCS (V4 and V2)
    ("https://storage.googleapis.com/my-bucket/shards/x?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential="
     "svc%40proj.iam.gserviceaccount.com%2F20240101%2Fauto%2Fstorage%2Fgoog4_request&X-Goog-Signature=8f1a2b3c4d",
     ["svc%40proj", "8f1a2b3c4d"], ["storage.googleapis.com/my-bucket/shards/x"]),
    ("https://storage.googleapis.com/my-bucket/obj?GoogleAccessId=svc@proj.iam.gserviceaccount.com"
     "&Expires=1700000000&Signature=BCDE%2Bfgh%3D",
     ["svc@proj", "BCDE%2Bfgh"], ["storage.googleapis.com/my-bucket/obj"]),
    # Azure SAS
    ("https://acct.blob.core.windows.net/shards/a.parquet?sv=2022-11-02&ss=b&srt=sco&sp=rl&se=2030-01-01T00:00:00Z"
     "&st=2024-01-01&spr=https&sig=Zm9vYmFyYmF6cXV4JTJGJTNE",
     ["Zm9vYmFyYmF6cXV4"], ["acct.blob.core.windows.net/shards/a.parquet", "sp=rl"]),
    ("abfss://container@acct.dfs.core.windows.net/shards?sig=SASSIGNATURE123&skoid=00000000-1111",
     ["SASSIGNATURE123", "00000000-1111"], ["abfss://container@acct.dfs.core.windows.net/shards"]),
    ("abfss://container:AccountKey123==@acct.dfs.core.windows.net/x", ["AccountKey123"], ["acct.dfs.core.windows.net/x"]),
    # tokens in query strings
    ("https://api.example/v1/x?token=tok-123456&page=2", ["tok-123456"], ["api.example/v1/x", "page=2"]),
    ("https://api.example/cb?access_token=ya29.a0AfH6SM&state=ok", ["ya29.a0AfH6SM"], ["state=ok"]),
    ("https://maps.example/api?api_key=abcdef123456", ["abcdef123456"], ["maps.example/api"]),
    ("https://www.googleapis.com/x?key=AIzaSyA1234567890abcdefghijklmnopqrstu", ["AIzaSyA1234567890"],
     ["www.googleapis.com/x"]),
    # env-style assignments in error text
    ("KeyError: AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCY is not valid", ["wJalrXUtnFEMI"],
     ["KeyError", "AWS_SECRET_ACCESS_KEY", "is not valid"]),
    ("env: MLFLOW_TRACKING_PASSWORD=hunter2 MLFLOW_TRACKING_USERNAME=vlp3d", ["hunter2"],
     ["MLFLOW_TRACKING_USERNAME=vlp3d"]),
    ("KEY=supersecretvalue in the job's environment", ["supersecretvalue"], ["KEY=", "environment"]),
    ("AWS_SESSION_TOKEN='FwoGZXIvYXdzEJr//////////' rejected", ["FwoGZXIvYXdzEJr"], ["AWS_SESSION_TOKEN", "rejected"]),
    ('{"aws_secret_access_key": "wJalrXUtnFEMI", "region": "us-east-1"}', ["wJalrXUtnFEMI"], ['"region": "us-east-1"']),
    ("password: hunter2", ["hunter2"], ["password"]),
    ("HF_TOKEN=hf_abcdefghijklmnop OPENAI_API_KEY=sk-proj-abc123", ["hf_abcdefghijklmnop", "sk-proj-abc123"],
     ["HF_TOKEN", "OPENAI_API_KEY"]),
    # bearer tokens and key shapes on their own
    ("401: Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N",
     ["eyJhbGciOiJIUzI1NiJ9", "dozjgNryP4J3jVmNHl0w5N"], ["401: Authorization"]),
    ("sent header Authorization: Basic dXNlcjpwYXNzd29yZA==", ["dXNlcjpwYXNzd29yZA=="], ["sent header"]),
    ("token ghp_0123456789abcdefghijABCDEFGHIJ012345 expired", ["ghp_0123456789abcdef"], ["expired"]),
    ("aws key AKIAIOSFODNN7EXAMPLE leaked", ["AKIAIOSFODNN7EXAMPLE"], ["aws key", "leaked"]),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----", ["MIIEowIBAAKCAQEA7"], []),
    # URIs inside longer error messages
    ("data.shards = 's3://k:s3cr3t@bucket/shards': pyarrow cannot open this filesystem URI (Invalid: "
     "Unrecognized filesystem type in URI: s3://k:s3cr3t@bucket/shards)", ["s3cr3t", "k:"],
     ["data.shards = 's3://bucket/shards'", "pyarrow cannot open"]),
    ("mlflow.exceptions.MlflowException: API request to http://vlp3d:hunter2@10.0.0.5:5000/api/2.0/mlflow/runs/"
     "create failed with exception HTTPConnectionPool(host='10.0.0.5', port=5000): Max retries exceeded",
     ["hunter2"], ["http://10.0.0.5:5000/api/2.0/mlflow/runs/create", "Max retries exceeded"]),
    ("could not mark MLflow run abc FAILED: ConnectionError: https://u:p@ss@mlflow.internal/ (refused)",
     ["p@ss", "u:"], ["https://mlflow.internal/", "(refused)", "abc FAILED"]),
]


@pytest.mark.parametrize("text, gone, kept", FORMS, ids=[f"form{i}" for i in range(len(FORMS))])
def test_every_form_of_credential_disappears_and_the_location_stays(text, gone, kept):
    out = redact(text)
    for secret in gone:
        assert secret not in out, (text, out)
    for part in kept:
        assert part in out, (text, out)
    assert redact(out) == out  # redacting twice changes nothing


def test_the_table_has_thirty_forms_or_more():
    assert len(FORMS) >= 30


@pytest.mark.parametrize("text", [
    "data.max_tokens = 0 must be at least 1.", "export RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN_PATH=~/.ray/token",
    "Token authentication is enabled", "Basic authentication.", "KeyError: 'train.lr'",
    "s3://bucket/shards/a@v2.parquet", "https://models.example/minilm", "train.lr=0.002, model.size='tiny'",
    "pleural effusion; no nodule", "http://127.0.0.1:8265", "VLP3D_PATIENT_KEY_FILE=/keys/project.key",
])
def test_text_without_credentials_is_left_as_it_is(text):
    assert redact(text) == text


def test_scrub_removes_paths_uids_and_the_known_names_of_a_row():
    reason = ("ValueError: /data/ct/8675309/series holds 2 series (1.2.840.113619.2.55.3.604688119.868, "
              "1.3.12.2.1107.5.1.4.54023.30000018); put one series per folder; see https://u:pw@host/x, "
              "volume 8675309_scan")
    out = scrub(reason, "8675309_scan")
    assert out == ("ValueError: <path> holds 2 series (<uid>, <uid>); put one series per folder; see https://host/x, "
                   "volume <file>")
    assert scrub("C:\\scans\\p1\\a.dcm unreadable") == "<path> unreadable"
    assert scrub("version 2.60.0 and spacing 0.75") == "version 2.60.0 and spacing 0.75"  # not UIDs
