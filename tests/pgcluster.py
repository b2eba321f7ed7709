"""A throwaway PostgreSQL cluster for the tests and the benchmark.

Installs the Debian package when missing (``scripts/apt-ensure.sh postgresql``), runs
``initdb`` in a fresh temporary directory and ``pg_ctl start`` with a unix socket in that
directory only (no TCP port: ``listen_addresses=''``), as the ``postgres`` user when run as
root (PostgreSQL refuses to run as root). :meth:`PgCluster.url` gives a
``postgresql://`` URL for a database of the cluster, optionally with its own schema (one
per store: tests never share tables). :meth:`PgCluster.stop` stops it and removes it.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        subprocess.run(["bash", str(ROOT / "scripts" / "apt-ensure.sh"), "postgresql"],
                       check=True)
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (initdb not found)")
    return Path(found[-1]).parent


class PgCluster:
    def __init__(self) -> None:
        self.bindir = _bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="medview-pg-"))
        self.data = self.dir / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
            self.user = "postgres"
        else:
            import getpass

            self.user = getpass.getuser()
        self.started = False
        self.owned = True                # stopped and removed by stop()

    @classmethod
    def attach(cls, directory: str | Path) -> "PgCluster":
        """The cluster another process of the same test run started in ``directory``
        (pytest-xdist workers share their controller's): used, never stopped here."""
        self = cls.__new__(cls)
        self.bindir = _bindir()
        self.dir = Path(directory)
        self.data = self.dir / "data"
        self.as_user = []
        self.user = "postgres" if os.geteuid() == 0 else __import__("getpass").getuser()
        self.started, self.owned = True, False
        return self

    def _run(self, *cmd: str) -> None:
        subprocess.run(self.as_user + list(cmd), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, cwd=self.dir)

    def start(self) -> "PgCluster":
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust",
                  "-U", self.user, "-E", "UTF8", "--no-sync")
        # fsync stays on (the default): the durability the server relies on is real
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-t", "300",
                  "-l", str(self.dir / "log"),
                  "-o", f"-k {self.dir} -c listen_addresses='' -c max_connections=200",
                  "start")
        self.started = True
        return self

    def url(self, schema: str | None = None, dbname: str = "postgres") -> str:
        """A URL for ``dbname`` over the cluster's unix socket; ``schema``: tables go into
        that schema (created on first use by the server's database layer)."""
        url = f"postgresql://{self.user}@/{dbname}?host={quote(str(self.dir), safe='')}"
        if schema:
            url += "&options=" + quote(f"-csearch_path={schema}", safe="{}")
        return url

    def fresh_url(self) -> str:
        """A URL with a schema of its own (a store that shares nothing)."""
        return self.url(schema="s_" + uuid.uuid4().hex[:16])

    def stop(self) -> None:
        if not self.owned:
            return
        if self.started:
            subprocess.run(self.as_user + [str(self.bindir / "pg_ctl"), "-D", str(self.data),
                                          "-m", "fast", "-w", "-t", "300", "stop"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir)
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)


def _schema_of(url: str) -> tuple[str, str]:
    """(URL without its options, the schema its search_path names)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    d = conninfo_to_dict(url)
    opts = d.pop("options", "") or ""
    schema = opts.split("search_path=", 1)[1].split()[0] if "search_path=" in opts else "public"
    return make_conninfo(**d), schema


def copy_schema(src_url: str, dst_url: str) -> None:
    """Copy every table of the source URL's schema (rows, keys, sequences) into the
    destination URL's schema, which must not exist yet (pg_dump | psql)."""
    bindir = _bindir()
    base, src = _schema_of(src_url)
    _, dst = _schema_of(dst_url)
    dump = subprocess.run([str(bindir / "pg_dump"), "-d", base, "-n", src, "--no-owner"],
                          check=True, capture_output=True).stdout.decode()
    subprocess.run([str(bindir / "psql"), "-d", base, "-q", "-v", "ON_ERROR_STOP=1"],
                   input=dump.replace(src, dst).encode(), check=True, capture_output=True)
