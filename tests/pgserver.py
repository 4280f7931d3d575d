"""Throwaway PostgreSQL servers for tests.

Usage::

    from tests.pgserver import throwaway_postgres, postgres_available

    with throwaway_postgres() as url:   # 'postgresql+psycopg://postgres@127.0.0.1:PORT/cde_test'
        engine = sqlalchemy.create_engine(url)
        ...

As a pytest session fixture::

    @pytest.fixture(scope="session")
    def pg_url():
        if not postgres_available():
            pytest.skip("PostgreSQL server binaries not installed")
        with throwaway_postgres() as url:
            yield url

Each server is brand new: a fresh ``initdb`` in a temporary directory, trust
authentication, listening on 127.0.0.1 only (on a free port) with its unix
socket inside the temporary directory, tuned for speed (fsync, synchronous
commit and full page writes off). On exit it is stopped with
``pg_ctl stop -m immediate`` and the temporary directory is removed.

When running as root the server binaries are run as the ``postgres`` OS user
through ``runuser`` (initdb refuses to run as root). The database superuser is
always called ``postgres``.

Only the standard library is needed; psycopg is not required to start a server.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

__all__ = [
    "PostgresNotAvailable",
    "PgServer",
    "find_pg_bindir",
    "postgres_available",
    "throwaway_postgres",
    "stop_all",
]

_RUNNING: set = set()   # servers started and not yet stopped, for `stop_all`

PREFERRED_MAJOR = "15"
_REQUIRED = ("initdb", "pg_ctl", "postgres")


class PostgresNotAvailable(RuntimeError):
    """The PostgreSQL server binaries (or the OS user to run them) are missing."""


def _candidate_bindirs() -> list[Path]:
    cands: list[str] = []
    env = os.environ.get("CDE_PG_BINDIR")
    if env:
        cands.append(env)
    cands.append(f"/usr/lib/postgresql/{PREFERRED_MAJOR}/bin")
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                cands.append(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    cands.append("/usr/local/bin")
    for exe in ("initdb", "pg_ctl"):
        found = shutil.which(exe)
        if found:
            cands.append(str(Path(found).parent))
    # any other installed major version, newest first
    cands.extend(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))
    seen, result = set(), []
    for c in cands:
        if c not in seen:
            seen.add(c)
            result.append(Path(c))
    return result


def _resolve_exe(bindir: Path, name: str) -> Optional[Path]:
    p = bindir / name
    if p.is_file() and os.access(p, os.X_OK):
        return p
    return None


def find_pg_bindir() -> Path:
    """Return a directory holding initdb, pg_ctl and postgres, or raise PostgresNotAvailable.

    ``pg_ctl`` locates ``postgres`` next to its own resolved path, so a directory
    of symlinks (e.g. /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb)
    is accepted when the symlink targets' directory has ``postgres``.
    """
    tried = []
    for d in _candidate_bindirs():
        initdb = _resolve_exe(d, "initdb")
        pg_ctl = _resolve_exe(d, "pg_ctl")
        if initdb and pg_ctl:
            real = Path(os.path.realpath(pg_ctl)).parent
            if _resolve_exe(real, "postgres") and _resolve_exe(Path(os.path.realpath(initdb)).parent, "postgres"):
                return real
        tried.append(str(d))
    raise PostgresNotAvailable(
        "PostgreSQL server binaries not found: need initdb, pg_ctl and postgres "
        f"(looked in: {', '.join(tried)}; set CDE_PG_BINDIR to override). "
        "On Debian install them with: apt-get install -y postgresql-15"
    )


def postgres_available() -> bool:
    """True when a throwaway server can be started (binaries found, and a
    ``postgres`` OS user plus ``runuser`` exist when running as root)."""
    try:
        find_pg_bindir()
        _run_as_prefix()
    except PostgresNotAvailable:
        return False
    return True


def _run_as_prefix() -> list[str]:
    if os.geteuid() != 0:
        return []
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresNotAvailable(
            "running as root but there is no 'postgres' OS user to run initdb/pg_ctl as "
            "(initdb refuses root); create one or install the postgresql package"
        ) from None
    runuser = shutil.which("runuser") or ("/usr/sbin/runuser" if os.path.exists("/usr/sbin/runuser") else None)
    if not runuser:
        raise PostgresNotAvailable("running as root but 'runuser' (util-linux) is not installed")
    return [runuser, "-u", "postgres", "--"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class PgServer:
    """A throwaway PostgreSQL server. Prefer the ``throwaway_postgres()`` context manager.

    Attributes after ``start()``: ``url``, ``port``, ``dbname``, ``tmpdir``,
    ``datadir``, ``logfile``, ``bindir``.
    """

    def __init__(self, dbname: str = "cde_test", *, timeout: float = 30.0,
                 base_dir: Optional[str] = None, bindir: Optional[str] = None, durable: bool = False):
        self.dbname = dbname
        self.durable = durable  # fsync, synchronous commit and full-page writes on, as a production server runs
        self.timeout = timeout
        self.base_dir = base_dir
        self.bindir = Path(bindir) if bindir else find_pg_bindir()
        self._prefix = _run_as_prefix()
        self.tmpdir: Optional[Path] = None
        self.port: Optional[int] = None
        self.url: Optional[str] = None
        self._started = False

    @property
    def datadir(self) -> Path:
        assert self.tmpdir is not None
        return self.tmpdir / "data"

    @property
    def logfile(self) -> Path:
        assert self.tmpdir is not None
        return self.tmpdir / "postgres.log"

    # -- helpers ---------------------------------------------------------
    def _run(self, args: list[str], what: str, timeout: Optional[float] = None) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        for k in list(env):
            if k.startswith("PG"):  # PGDATA, PGPORT, PGHOST... must not leak in
                del env[k]
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        try:
            res = subprocess.run(
                self._prefix + args, cwd=str(self.tmpdir), env=env,
                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=timeout or self.timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{what} timed out after {e.timeout}s\n{self._log_tail()}") from None
        if res.returncode != 0:
            raise RuntimeError(
                f"{what} failed (exit {res.returncode}): {' '.join(args)}\n"
                f"stdout: {res.stdout.strip()}\nstderr: {res.stderr.strip()}\n{self._log_tail()}"
            )
        return res

    def _log_tail(self, n: int = 20) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()[-n:]
            return "server log tail:\n" + "\n".join(lines)
        except (OSError, AssertionError):
            return ""

    # -- lifecycle -------------------------------------------------------
    def start(self) -> str:
        self.tmpdir = Path(tempfile.mkdtemp(prefix="cde-pg-", dir=self.base_dir))
        try:
            if self._prefix:
                import pwd

                pw = pwd.getpwnam("postgres")
                os.chown(self.tmpdir, pw.pw_uid, pw.pw_gid)
            bd = self.bindir
            self._run([str(bd / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                       "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync",
                       "--no-instructions"], "initdb")
            last_err: Optional[Exception] = None
            for _attempt in range(3):  # retry if another process grabbed the port
                self.port = _free_port()
                self._write_conf()
                try:
                    self._run([str(bd / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
                               "-w", "-t", str(int(self.timeout)), "start"], "pg_ctl start")
                    break
                except RuntimeError as e:
                    last_err = e
                    if _port_open(self.port):
                        continue
                    raise
            else:
                raise last_err  # type: ignore[misc]
            self._started = True
            _RUNNING.add(self)
            self._wait_ready()
            self._create_db()
            self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.dbname}"
            return self.url
        except BaseException:
            self.stop()
            raise

    def _write_conf(self) -> None:
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.tmpdir}'",
            "fsync": "on" if self.durable else "off",
            "synchronous_commit": "on" if self.durable else "off",
            "full_page_writes": "on" if self.durable else "off",
            "max_connections": "50",
            "shared_buffers": "32MB",
            "dynamic_shared_memory_type": "posix",
            "max_wal_senders": "0",
            "wal_level": "minimal",
            "autovacuum": "off",
            "logging_collector": "off",
            "log_min_messages": "warning",
            "timezone": "'UTC'",
        }
        text = "".join(f"{k} = {v}\n" for k, v in conf.items())
        # postgresql.auto.conf is read last and wins over postgresql.conf
        (self.datadir / "postgresql.auto.conf").write_text(text)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        isready = self.bindir / "pg_isready"
        while True:
            if isready.exists():
                r = subprocess.run([str(isready), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
                                   stdin=subprocess.DEVNULL, capture_output=True)
                if r.returncode == 0:
                    return
            elif _port_open(self.port):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL on port {self.port} not ready after {self.timeout}s\n{self._log_tail()}")
            time.sleep(0.05)

    def _create_db(self) -> None:
        if self.dbname == "postgres":
            return
        ident = '"' + self.dbname.replace('"', '""') + '"'
        psql = self.bindir / "psql"
        if psql.exists():
            self._run([str(psql), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port),
                       "-U", "postgres", "-d", "postgres", "-c", f"CREATE DATABASE {ident}"], "CREATE DATABASE")
            return
        import psycopg  # fallback when the client binaries are absent

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True, connect_timeout=int(self.timeout)) as conn:
            conn.execute(f"CREATE DATABASE {ident}")

    def stop(self) -> None:
        try:
            if self._started and self.tmpdir is not None and self.datadir.exists():
                try:
                    self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate",
                               "-w", "-t", "15", "stop"], "pg_ctl stop", timeout=30)
                except RuntimeError:
                    self._kill_postmaster()
        finally:
            self._started = False
            _RUNNING.discard(self)
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.05)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def throwaway_postgres(dbname: str = "cde_test", *, timeout: float = 30.0,
                       base_dir: Optional[str] = None, durable: bool = False) -> Iterator[str]:
    """Start a brand-new PostgreSQL server and yield its SQLAlchemy URL
    ``postgresql+psycopg://postgres@127.0.0.1:PORT/<dbname>``; stop it and delete
    its files on exit.

    Raises PostgresNotAvailable (a RuntimeError) naming what is missing when the
    server binaries are not installed, and RuntimeError (with the server log
    tail) if the server fails to start within ``timeout`` seconds.
    ``base_dir`` is where the temporary directory goes (default: $TMPDIR or
    /tmp); when running as root it must be traversable by the postgres user.
    ``durable=True`` turns fsync and synchronous commit on (benchmarks of
    acknowledged-after-commit ingest); tests run faster without.
    """
    server = PgServer(dbname, timeout=timeout, base_dir=base_dir, durable=durable)
    server.start()
    try:
        yield server.url  # type: ignore[misc]
    finally:
        server.stop()


def stop_all() -> None:
    """Stop every server this process started and has not stopped (e.g. from a SIGTERM handler, where fixture teardown
    may not get that far)."""
    for server in list(_RUNNING):
        server.stop()
