"""docker-compose.yml and the Dockerfile, which cannot be run here (no Docker engine): what can
be checked without one. The gateway they start listens on 0.0.0.0, so it must get a key."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_requires_a_secret_from_the_environment_with_a_clear_message() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    gateway = compose["services"]["gateway"]["environment"]
    assert gateway["TASKCAST_HOST"] == "0.0.0.0"
    # ${VAR:?message}: compose refuses to start when the variable is unset or empty.
    match = re.fullmatch(r"\$\{TASKCAST_JWT_SECRET:\?(.+)\}", gateway["TASKCAST_JWT_SECRET"])
    assert match is not None, gateway["TASKCAST_JWT_SECRET"]
    assert "at least 32 bytes" in match.group(1)
    assert "TASKCAST_AUTH" not in gateway  # access control stays on
    # Published on the host's loopback only: other machines go through a proxy.
    assert compose["services"]["gateway"]["ports"] == ["127.0.0.1:8000:8000"]


def test_the_image_listens_on_every_address_and_documents_the_key() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "TASKCAST_HOST=0.0.0.0" in dockerfile
    assert "TASKCAST_JWT_SECRET" in dockerfile
    instructions = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    assert not any("TASKCAST_AUTH" in line for line in instructions)  # not switched off
