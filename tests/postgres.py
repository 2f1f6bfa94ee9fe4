"""A real PostgreSQL 15 server for tests, started once per pytest session in a temporary folder.

    .venv/bin/python -m pytest -q tests/test_sweep_postgres.py
    # -> `postgres_url` is "postgresql+psycopg2://podium@127.0.0.1:PORT/podium"

PostgreSQL refuses to run as root, so the server runs as the `postgres` system user (through
`runuser`) on a data folder that user owns, listening on a free loopback port only, with trust
authentication (nothing outside 127.0.0.1 can reach it, and it lives only as long as the
session). The fixture skips, with the reason, where the binaries, `runuser` or root are missing;
install PostgreSQL with `apt-get install postgresql-15` (Debian/Ubuntu).

Each consumer that wants a clean slate creates its own database with `create_database(url, name)`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("PODIUM_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"  # the system account the server runs as
DB_USER = "podium"  # the database role the tests connect as
DB_NAME = "podium"


def _skip_reason() -> str | None:
    for tool in ("initdb", "pg_ctl", "postgres", "psql"):
        if not (PG_BIN / tool).exists():
            return f"PostgreSQL 15 not installed ({PG_BIN / tool} missing; apt-get install postgresql-15)"
    if shutil.which("runuser") is None:
        return "runuser missing: needed to start PostgreSQL as the postgres user"
    if os.geteuid() != 0:
        return "not root: starting PostgreSQL as the postgres user needs runuser, which needs root"
    try:
        import pwd

        pwd.getpwnam(PG_USER)
    except KeyError:
        return f"no '{PG_USER}' system user to run PostgreSQL as"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 not installed (pip install 'psycopg2-binary>=2.9,<3')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", PG_USER, "--", *args], capture_output=True, text=True,
                          check=check, timeout=timeout)


def _psql(port: int, sql: str, db: str = "postgres") -> None:
    _as_postgres(str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, "-d", db,
                 "-v", "ON_ERROR_STOP=1", "-c", sql)


def create_database(url: str, name: str) -> str:
    """Create database `name` on the server behind `url` (owned by the test role); return its URL."""
    import psycopg2

    base, _ = url.rsplit("/", 1)
    conn = psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://"))
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return f"{base}/{name}"


class PostgresServer:
    """initdb + pg_ctl start on a private folder; `stop()` shuts it down and removes the folder."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="podium-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        # The postgres user must own the folder (and reach it: tmp folders are mode 700).
        os.chmod(self.root, 0o755)
        shutil.chown(self.root, user=PG_USER, group=None)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    def start(self) -> None:
        _as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", PG_USER, "-A", "trust",
                     "-E", "UTF8", "--no-sync")
        # Loopback only; socket in our folder (the system's /var/run/postgresql may not exist);
        # fsync off: a test server that dies loses nothing anyone needs, and it is much faster.
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "server.log"),
                     "-w", "-t", "60", "start")
        _psql(self.port, f"CREATE ROLE {DB_USER} LOGIN CREATEDB")
        _psql(self.port, f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop",
                         check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="session")
def postgres_url():
    """SQLAlchemy URL of a running PostgreSQL 15 database (session-wide; skipped where unavailable)."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    server = PostgresServer()
    try:
        try:
            server.start()
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"PostgreSQL did not start: {exc.stderr}\n{server.log()[-2000:]}") from exc
        deadline = time.monotonic() + 30
        while True:  # pg_ctl -w waited already; a connect proves the role and database work
            try:
                import psycopg2

                psycopg2.connect(server.url.replace("postgresql+psycopg2://", "postgresql://")).close()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield server.url
    finally:
        server.stop()
