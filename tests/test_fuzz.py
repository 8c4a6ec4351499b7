"""Schemathesis fuzzes a live router (a worker, mock engines) from its own OpenAPI document.

Bounded: a few examples per operation and a time budget, so it fits CI. Passes when no answer
is a 5xx, every answer has a documented status code and content type and validates against its
documented response schema, requests the document forbids are refused, nothing crashed, and the
router still serves afterwards.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid

import pytest

from conftest import ROOT
from helpers import DEMO_MODELS, request, start_router, start_worker, wait_models, write_config

pytestmark = pytest.mark.skipif(shutil.which("schemathesis", path=str(ROOT / ".venv" / "bin")) is None
                                and shutil.which("schemathesis") is None,
                                reason="schemathesis is not installed (pip install -e '.[test]')")


# Every answer: no 5xx, a status code the document lists for the operation, a documented
# content type, and a body that validates against the response schema (generated from the
# msgspec structs the handlers encode, so a drift between code and document fails here); and a
# request that violates the document (a parameter out of its schema) must be refused with a 4xx.
CHECKS = ",".join(("not_a_server_error", "status_code_conformance", "content_type_conformance",
                   "response_schema_conformance", "negative_data_rejection"))


def test_fuzz_the_router_from_its_openapi_document(procs, redis_url, tmp_path) -> None:
    config = write_config(tmp_path / "models.toml", *DEMO_MODELS)
    start_worker(procs, redis_url, config, f"w-{uuid.uuid4().hex[:8]}")
    router = start_router(procs, redis_url, env={"LLM_ROUTER_START_TIMEOUT": "20"})
    wait_models(router, 2)
    exe = shutil.which("schemathesis", path=str(ROOT / ".venv" / "bin")) or shutil.which("schemathesis")
    done = subprocess.run(
        [exe, "run", f"{router.url}/openapi.json", "--checks", CHECKS, "--max-examples", "4",
         "--max-time", "30", "--request-timeout", "30", "--seed", "1", "--no-color", "--workers", "1",
         "--phases", "examples,coverage,fuzzing", "--suppress-health-check", "all"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    report = done.stdout[-12000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    assert router.proc.poll() is None, "the router crashed"
    assert request("GET", f"{router.url}/health").status == 200
    assert "Internal Server Error" not in procs.log(router.proc)
