"""podium.common.redact: passwords in URLs are hidden, everything else is left as it was."""

from __future__ import annotations

import pytest

from podium.common.redact import redact, redact_text


@pytest.mark.parametrize("text, expected", [
    ("tracking.uri=https://alice:s3cret@host:5000/x", "tracking.uri=https://alice:***@host:5000/x"),
    ("postgresql://bob:pw@db/optuna and s3://k:v@bucket", "postgresql://bob:***@db/optuna and s3://k:***@bucket"),
    ("https://TOKEN@host", "https://***@host"),
    ("https://alice:@host", "https://alice:***@host"),
    ("http://127.0.0.1:5000/api", "http://127.0.0.1:5000/api"),  # a port is not a password
    ("https://host/a@b", "https://host/a@b"),  # an @ in the path is not userinfo
    ("mail alice@example.org", "mail alice@example.org"),
    ("sqlite:////runs/mlflow.db", "sqlite:////runs/mlflow.db"),
])
def test_redact_text(text, expected):
    assert redact_text(text) == expected


def test_redact_walks_nested_values():
    value = {"argv": ["podium", "tracking.uri=http://u:p@h"], "n": 3, "t": ("x://a:b@c",)}
    assert redact(value) == {"argv": ["podium", "tracking.uri=http://u:***@h"], "n": 3, "t": ("x://a:***@c",)}


@pytest.mark.parametrize("uri, expected", [
    ("http://alice:s3cret@host:5000/x", ("http://host:5000/x", "alice", "s3cret")),
    ("https://token@host", ("https://host", "token", None)),
    ("http://host:5000", ("http://host:5000", None, None)),
    ("sqlite:///runs/mlflow.db", ("sqlite:///runs/mlflow.db", None, None)),
])
def test_split_credentials(uri, expected):
    from podium.common.redact import split_credentials

    assert split_credentials(uri) == expected
