"""A throwaway PostgreSQL cluster for tests, and one fresh database per use.

``.ci/run`` installs Debian's ``postgresql`` package, starts a cluster in a temp dir and exports
``PRUNEGRAPH_TEST_POSTGRES_URL`` (a SQLAlchemy URL to its ``postgres`` database). Without that
variable, :func:`cluster_url` starts such a cluster itself when the server binaries are on this
machine (``/usr/lib/postgresql/*/bin`` or ``initdb`` on the PATH): ``initdb`` with trust auth in
a temp dir (as the ``postgres`` user when run as root, since initdb refuses root), listening on
a unix socket in that dir only (no TCP port, no system service). Otherwise the tests that need
it skip, saying why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

ENV = "PRUNEGRAPH_TEST_POSTGRES_URL"


def _bin_dir() -> Path | None:
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Cluster:
    """A cluster in its own temp dir, stopped and removed by :meth:`stop`."""

    def __init__(self) -> None:
        self.bin = _bin_dir()
        self.dir: Path | None = None

    def _run(self, *cmd: str) -> None:
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_postgres, *cmd], check=True, capture_output=True, timeout=120)

    def start(self) -> str:
        """Start the cluster; the SQLAlchemy URL of its ``postgres`` database.

        Raises:
            RuntimeError: no PostgreSQL server binaries here, or the cluster did not start
                (the reason is in the message).
        """
        if self.bin is None:
            raise RuntimeError(
                "PostgreSQL is not installed (no initdb): apt-get install -y postgresql"
            )
        self.dir = Path(tempfile.mkdtemp(prefix="prunegraph-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        data = self.dir / "data"
        try:
            self._run(str(self.bin / "initdb"), "-D", str(data), "-U", "postgres",
                      "--auth=trust", "-E", "UTF8")  # fmt: skip
            opts = f"-k {self.dir} -c listen_addresses='' -c fsync=off -c max_connections=200"
            self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-o", opts,
                      "-l", str(self.dir / "log"), "-w", "start")  # fmt: skip
        except (subprocess.SubprocessError, OSError) as e:
            detail = getattr(e, "stderr", b"") or b""
            self.stop()
            raise RuntimeError(f"the PostgreSQL cluster did not start: {e} {detail!r}") from e
        return f"postgresql+psycopg://postgres@/postgres?host={self.dir}"

    def stop(self) -> None:
        if self.dir is None:
            return
        if self.bin is not None and (self.dir / "data" / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"),
                          "-m", "immediate", "stop")  # fmt: skip
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None


def fresh_database(admin_url: str) -> str:
    """Create an empty database on ``admin_url``'s server; its URL (same user and host)."""
    import sqlalchemy as sa

    name = f"t_{uuid.uuid4().hex[:16]}"
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    url = sa.make_url(admin_url).set(database=name)
    return url.render_as_string(hide_password=False)
