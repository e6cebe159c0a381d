"""A few rows of ``tests/test_user_errors.py`` as a user runs them: a real ``mlpipe`` process,
stdout and stderr apart, the planted secrets in its environment and arguments (issue 20)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.test_user_errors import (
    DEAD,
    ENV_SECRETS,
    FAST_HTTP,
    GIT_TOKEN,
    PG_AT,
    PG_QUERY,
    S3,
    assert_user_error,
)

pytestmark = pytest.mark.integration

SUBPROCESS_CASES = [
    ["run", f"https://oauth2:{GIT_TOKEN}@127.0.0.1:9/team/repo.git"],
    ["server", "--backend-store-uri", PG_AT, *S3],
    ["server", "--backend-store-uri", PG_QUERY, *S3],
    ["promote", "m", "1", "--tracking-uri", DEAD],
]
"""A few rows again as a user runs them: a real process, stdout and stderr apart."""


@pytest.mark.parametrize("args", SUBPROCESS_CASES, ids=lambda a: a[0])
def test_bad_input_in_a_real_process(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MLPIPE_", "AWS_"))}
    result = subprocess.run(
        [sys.executable, "-m", "mlpipe.cli", *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
        env={**env, **ENV_SECRETS, **FAST_HTTP},
    )  # fmt: skip
    assert_user_error(result.stdout + result.stderr, result.returncode, args)
    assert not [line for line in result.stdout.splitlines() if line.startswith("Error:")]
    assert not (tmp_path / "mlruns.db").exists()
