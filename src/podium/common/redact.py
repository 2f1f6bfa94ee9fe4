"""Credentials out of what podium writes: `scheme://user:password@host` -> `scheme://user:***@host`.

A tracking URI (`tracking.uri=https://alice:s3cret@mlflow.example.org`), an optuna storage or an
fsspec mirror may carry a password; podium writes such strings to environment.json (the command
line), config.yaml, MLflow params and console messages. Every such place passes them through
`redact_text`; the run itself keeps using the real value.

    >>> redact_text("podium train tracking.uri=https://alice:s3cret@host:5000")
    'podium train tracking.uri=https://alice:***@host:5000'
"""

from __future__ import annotations

import re
from typing import Any

# userinfo of an authority: up to the first "@" that precedes the host, with no "/" (the path)
# or whitespace in between. A token alone (https://TOKEN@host) is hidden whole.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s/@:]*)(?P<password>:[^\s/@]*)?@")


def _hide(match: re.Match) -> str:
    if match.group("password") is not None:
        return f"{match.group('scheme')}{match.group('user')}:***@"
    return f"{match.group('scheme')}***@"


def redact_text(text: str) -> str:
    """`text` with the userinfo of every URL in it hidden (user kept, password or token → ***)."""
    return _USERINFO.sub(_hide, text)


def redact(value: Any) -> Any:
    """`redact_text` applied to every string inside nested dicts, lists and tuples."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: redact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item) for item in value)
    return value


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(uri without userinfo, user, password) of `scheme://user:password@host/...`; a URI
    without userinfo comes back unchanged with (None, None)."""
    match = _USERINFO.match(uri or "")
    if not match:
        return uri, None, None
    password = match.group("password")
    return (match.group("scheme") + uri[match.end():], match.group("user") or None,
            password[1:] if password else None)
