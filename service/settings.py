"""Service settings, read from the environment (prefix ``PRUNEGRAPH_``) or passed explicitly."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Configuration of one service process.

    ``tokens`` is ``"alice:secret1,bob:secret2"`` (user:token pairs); ``tokens_file`` holds the same
    pairs, one a line (``#`` comments allowed). With neither, auth is off and every request acts
    as the user ``anonymous``.
    """

    model_config = SettingsConfigDict(env_prefix="PRUNEGRAPH_", extra="ignore")

    data_dir: Path = Field(Path("prunegraph-data"), description="checkpoints, temp files, DB")
    database_url: str | None = Field(
        None, description="any SQLAlchemy URL; default: SQLite file data_dir/prunegraph.db"
    )
    max_upload_bytes: int = Field(512 * MiB, gt=0, description="largest accepted checkpoint")
    max_json_bytes: int = Field(
        4 * MiB,
        gt=0,
        description="largest request body other than an upload (a job's JSON); a larger "
        "manifest goes as a file: multipart POST /v1/jobs with fields request and manifest",
    )
    upload_idle_s: float = Field(
        60.0, gt=0, description="a request whose body sends nothing for this long is closed (408)"
    )
    quota_bytes: int = Field(
        20 * 1024 * MiB,
        ge=0,
        description="bytes each user may store (checkpoints and "
        "activations, as uploaded); 0: no limit",
    )
    quota_jobs: int = Field(100, ge=0, description="queued + running jobs per user; 0: no limit")
    rate_limit: int = Field(
        6000, ge=0, description="requests per minute per user (bursts up to that many); 0: off"
    )
    auth_failure_limit: int = Field(
        60, ge=0, description="failed authentications per minute per client address; 0: off"
    )
    tokens: str = Field("", description="user:token pairs, comma-separated")
    session_ttl_s: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="a dashboard login lasts this long (its cookie holds a random session id, "
        "never the token; POST /logout ends it)",
    )
    tokens_file: Path | None = Field(None, description="user:token pairs, one a line")
    workers: int = Field(2, ge=1, description="analysis worker processes")
    job_lease_s: float = Field(
        30.0,
        ge=0.5,
        description="a queued or running job whose replica has not renewed it for this long "
        "(crashed, killed) is taken over by any replica sharing the database",
    )
    cache: bool = Field(
        True, description="keep per-group results in data_dir/cache for later jobs to reuse"
    )
    dask_scheduler: str | None = Field(
        None,
        description="a Dask scheduler's address (tcp://host:8786): every job's per-group "
        "analysis runs as tasks on that cluster, whose workers should mount data_dir at the "
        "same path (the shared result cache); unset: in the service's own worker processes",
    )

    @field_validator("dask_scheduler")
    @classmethod
    def _scheduler(cls, v: str | None) -> str | None:
        v = (v or "").strip()
        if not v:
            return None  # PRUNEGRAPH_DASK_SCHEDULER="" means none
        if "://" not in v:
            v = f"tcp://{v}"
        host = v.split("://", 1)[1]
        if not host or host.startswith(":"):
            raise ValueError(f"dask_scheduler {v!r} is not an address such as tcp://host:8786")
        return v

    def cache_dir(self) -> Path | None:
        return self.data_dir / "cache" if self.cache else None

    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'prunegraph.db').resolve()}"

    def token_users(self) -> dict[str, str]:
        """token -> user; empty when auth is off.

        Raises:
            ValueError: a malformed entry (named by its place, never echoed: it may be a
                secret) or a token given to two users.
        """
        entries = [("PRUNEGRAPH_TOKENS", i + 1, p) for i, p in enumerate(self.tokens.split(","))]
        if self.tokens_file is not None:
            lines = self.tokens_file.read_text(encoding="utf-8").splitlines()
            entries += [(str(self.tokens_file), i + 1, ln) for i, ln in enumerate(lines)]
        users: dict[str, str] = {}
        for where, index, entry in entries:
            if not entry.strip() or entry.lstrip().startswith("#"):
                continue
            user, sep, token = (part.strip() for part in entry.partition(":"))
            place = f"entry {index}" if where == "PRUNEGRAPH_TOKENS" else f"line {index}"
            if not sep or not user or not token:
                raise ValueError(f"{where} {place} is not user:token")
            if token in users and users[token] != user:
                raise ValueError(f"{where} {place}: a token of user {users[token]!r} is reused")
            users[token] = user
        return users
