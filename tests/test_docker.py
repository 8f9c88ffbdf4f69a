"""docker/: no engine runs on these machines, so check what can be checked without one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_is_slim_non_root_cpu_torch_with_healthcheck() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert "torch==2.13.0" in text and "torchvision" not in text
    assert re.search(r"^USER prunegraph", text, re.M) and "useradd" in text
    assert re.search(r"^HEALTHCHECK .*", text, re.M) and "/healthz" in text
    assert 'VOLUME ["/data"]' in text and "PRUNEGRAPH_DATA_DIR=/data" in text
    for copied in ("graphs", "service", "clients", "prunegraph", "pyproject.toml"):
        assert copied in text
        assert (ROOT / copied).exists()


def test_compose_file_parses_and_points_at_the_dockerfile() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    svc = compose["services"]["prunegraph"]
    build = svc["build"]
    assert (ROOT / "docker" / build["context"] / build["dockerfile"]).resolve() == (
        ROOT / "docker" / "Dockerfile"
    ).resolve()
    assert "8000:8000" in svc["ports"]
    assert "prunegraph-data:/data" in svc["volumes"] and "prunegraph-data" in compose["volumes"]
    assert svc["environment"]["PRUNEGRAPH_DATA_DIR"] == "/data"


def test_compose_runs_the_service_on_its_postgres() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    pg, svc = compose["services"]["postgres"], compose["services"]["prunegraph"]
    assert pg["image"].startswith("postgres:") and "pg_isready" in pg["healthcheck"]["test"]
    assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
    url = svc["environment"]["PRUNEGRAPH_DATABASE_URL"]
    env = pg["environment"]
    assert "postgresql+psycopg://" in url and "@postgres:5432/" in url
    assert env["POSTGRES_USER"] in url and url.rstrip("}").endswith(env["POSTGRES_DB"])
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    extras = re.search(r'pip install "\.\[([\w,]+)\]"', dockerfile)
    assert extras and {"server", "postgres"} <= set(extras[1].split(","))  # the service, the driver
    volume = pg["volumes"][0].split(":")[0]
    assert volume in compose["volumes"]
