"""A real, throw-away PostgreSQL server for tests (no mock, no Docker).

    server = PostgresServer.start()        # initdb + pg_ctl start on a free 127.0.0.1 port
    url = server.create_database("db1")    # postgresql+psycopg://fairfront:<password>@127.0.0.1:<port>/db1
    server.stop()                          # pg_ctl stop, data directory removed

The server runs as an unprivileged OS user (PostgreSQL refuses to run as root): the current user
when it is not root, else ``postgres`` (Debian's package creates it) or ``nobody``. Every TCP
login needs a password (scram-sha-256), so tests of password masking and of a wrong password are
real. :func:`find_bin_dir` returns None where no server binaries exist; callers skip then.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

ROLE = "fairfront"


def find_bin_dir() -> Path | None:
    """The newest PostgreSQL server binary folder (initdb, pg_ctl, postgres), or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    for folder in reversed(candidates):
        if all((Path(folder) / b).is_file() for b in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> str | None:
    """None: run as ourselves. Else the unprivileged user to run the server as."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


@dataclass
class PostgresServer:
    bin_dir: Path
    data_dir: Path
    port: int
    password: str  # of the ROLE role (and of the superuser)
    user: str | None  # OS user running the server (None: this process's user)
    host: str = "127.0.0.1"
    options: str = ""  # postgres command-line options (port, listen address, socket folder)

    @classmethod
    def start(cls, bin_dir: Path | None = None, *, attempts: int = 3) -> "PostgresServer":
        bin_dir = bin_dir or find_bin_dir()
        if bin_dir is None:
            raise FileNotFoundError("no PostgreSQL server binaries found")
        user = _server_user()
        root = Path(tempfile.mkdtemp(prefix="fairfront-pg-"))
        os.chmod(root, 0o755)
        data_dir = root / "data"
        password = "pw-" + secrets.token_urlsafe(12)
        pwfile = root / "pwfile"
        pwfile.write_text(password + "\n")
        if user is not None:
            info = pwd.getpwnam(user)
            for path in (root, pwfile):
                os.chown(path, info.pw_uid, info.pw_gid)
        server = cls(bin_dir, data_dir, 0, password, user)
        server._run("initdb", "-D", str(data_dir), "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={pwfile}",
                    "--no-locale", "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        last = None
        for _ in range(attempts):  # a free port can be taken between probing and binding
            server.port = _free_port()
            server.options = f"-c listen_addresses=127.0.0.1 -p {server.port} -k {root} -c fsync=off -c max_connections=200"
            try:
                server._start()
                break
            except subprocess.CalledProcessError as err:
                last = err
        else:
            raise RuntimeError(f"PostgreSQL did not start: {last}\n{server.log_tail()}")
        server._admin(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'")
        return server

    def url(self, database: str = "postgres", *, user: str = ROLE, password: str | None = None, host: str | None = None,
            port: int | None = None) -> str:
        password = self.password if password is None else password
        return (f"postgresql+psycopg://{user}:{quote(password, safe='')}@{host or self.host}:{port or self.port}/{database}")

    def create_database(self, name: str) -> str:
        """A fresh database owned by the password-protected role; returns its SQLAlchemy URL."""
        self._admin(f'CREATE DATABASE "{name}" OWNER {ROLE}')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)

    def restart(self, down_seconds: float = 0.0, stopped: threading.Event | None = None) -> None:
        """Stop the server (dropping every connection; ``stopped`` is set then), wait, start it
        again on the same port."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        if stopped is not None:
            stopped.set()
        time.sleep(down_seconds)
        self._start()

    def _start(self) -> None:
        log = self.data_dir.parent / "server.log"
        self._run("pg_ctl", "-D", str(self.data_dir), "-o", self.options, "-l", str(log), "-w", "-t", "60", "start")

    def log_tail(self, lines: int = 30) -> str:
        log = self.data_dir.parent / "server.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else ""

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host=self.host, port=self.port, user="postgres", password=self.password, dbname="postgres",
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin_dir / program), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd="/")
