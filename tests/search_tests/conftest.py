"""Fixtures of the search tests: a real PostgreSQL server for the distributed-storage tests."""

from __future__ import annotations

import importlib.util
import itertools
import re
import sys
from pathlib import Path

import pytest


def _load_postgres_server():
    # tests/ is not a package: load the shared module by its path, once per session.
    if "postgres_server" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "postgres_server.py"
        spec = importlib.util.spec_from_file_location("postgres_server", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["postgres_server"] = module
        spec.loader.exec_module(module)
    return sys.modules["postgres_server"]


postgres_server = _load_postgres_server()
_databases = itertools.count()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on a free 127.0.0.1 port with a password-protected role,
    stopped and deleted at the end of the session."""
    bin_dir = postgres_server.find_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin or on PATH")
    pytest.importorskip("psycopg", reason="psycopg (the 'postgres' extra) is not installed")
    server = postgres_server.PostgresServer.start(bin_dir)
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres, request) -> str:
    """A fresh database (named after the test) on the session's server; its URL holds the password."""
    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    return postgres.create_database(f"t{next(_databases)}_{name}")
