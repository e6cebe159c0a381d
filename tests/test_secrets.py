"""The one masking function and its helpers (mlpipe.core.secrets), pure: no process, no network."""

from __future__ import annotations

import pytest

from mlpipe.core.secrets import argv_without, has_secret, mask_uri, scrub, secret_parts
from mlpipe.core.settings import redact_uri


@pytest.mark.parametrize(
    ("uri", "masked"),
    [
        ("postgresql://u:pw-123@h:5432/db", "postgresql://***@h:5432/db"),
        ("postgresql://h/db?user=u&password=pw-123", "postgresql://h/db?user=u&password=***"),
        ("postgresql://u:sec@ret99@127.0.0.1/db", "postgresql://***@127.0.0.1/db"),
        ("postgresql://h/db?sslpassword=x1&sslmode=require", "postgresql://h/db?sslpassword=***&sslmode=require"),
        ("https://TOKEN123@github.com/o/r.git", "https://***@github.com/o/r.git"),
        ("s3://b/k?X-Amz-Signature=abc&X-Amz-Credential=def", "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***"),
        ("sqlite:////abs/path/mlflow.db", "sqlite:////abs/path/mlflow.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("", ""),
    ],
)  # fmt: skip
def test_mask_uri_forms(uri, masked):
    assert mask_uri(uri) == masked
    assert redact_uri(uri) == masked  # the old name is the same function


def test_scrub_removes_password_tail_quoted_by_a_driver():
    uri = "postgresql://u:sec@ret99@127.0.0.1/db"
    assert "ret99" in secret_parts(uri)
    said = "failed to resolve host 'ret99@127.0.0.1': Name or service not known"
    assert scrub(said, [uri]) == "failed to resolve host '***@127.0.0.1': Name or service not known"


def test_scrub_masks_keyword_dsns_and_uris_in_free_text():
    text = "invalid dsn: host=h password=hunter22 token: abc123 see mysql://root:toor@db/x"
    out = scrub(text, secrets=["abc123"])
    assert "hunter22" not in out and "abc123" not in out and "toor" not in out
    assert "host=h" in out


def test_has_secret():
    assert has_secret("postgresql://u:p@h/db")
    assert has_secret("postgresql://h/db?password=x")
    assert not has_secret("postgresql://u@h/db")
    assert not has_secret("postgresql://h/db?user=u")


def test_argv_without_moves_both_option_forms():
    argv = [
        "server",
        "--backend-store-uri",
        "pg://u:p@h/d",
        "--port",
        "5",
        "--auth-db-uri=x://a:b@h",
    ]
    rest, moved = argv_without(argv, {"--backend-store-uri": "A", "--auth-db-uri": "B"})
    assert rest == ["server", "--port", "5"]
    assert moved == {"A": "pg://u:p@h/d", "B": "x://a:b@h"}
