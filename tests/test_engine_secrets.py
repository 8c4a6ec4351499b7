"""What an engine may see, and what the world may see of an engine's secrets.

- An engine's environment is an allow-list (``worker/engine_env.py``): the worker's API keys
  and Redis URL never reach ``/proc/<engine pid>/environ``; the model's ``env`` and ``PATH`` do.
- Secrets given to an engine (``--api-key X``, ``--hf-token=X``, the model's ``api_key``) are
  masked in everything logged or published (``llm_router/redact.py``): the ``starting:`` line
  and the engine's own echo of its arguments in ``llm:logs:{model}``, the worker's log, a
  failed start's reply, the info API, ``config check``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
from conftest import MOCK_ENGINE, ROOT, role_url, wait_for
from helpers import model_block, request, start_router, start_worker, wait_models, write_config
from llm_lab_router.protocol import Instance, Keys, from_hash, log_entry
from llm_lab_router.redact import Redactor, redact_argv, redact_url, secret_name
from llm_lab_router.worker.engine_env import engine_env

KEYS = Keys()


# --------------------------------------------------------------------------- pure functions


def test_engine_env_is_an_allow_list() -> None:
    worker_env = {"PATH": "/usr/bin", "HOME": "/home/op", "LC_ALL": "C.UTF-8", "HF_HOME": "/data/hf",
                  "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "PYTHONUNBUFFERED": "1",
                  "LLM_ROUTER_API_KEYS": "client-key", "LLM_ROUTER_ADMIN_KEYS": "admin-key",
                  "LLM_ROUTER_REDIS_URL": "redis://worker:pw@db:6379/0", "LLM_ROUTER_TEST_SESSION": "t0k",
                  "AWS_SECRET_ACCESS_KEY": "aws", "HF_REDIS": "rediss://u:pw@db/0", "OPENAI_API_KEY": "sk"}
    env = engine_env(worker_env, {"MY_SETTING": "on", "LLM_ROUTER_ADMIN_KEYS": "from-model"},
                     {"CUDA_VISIBLE_DEVICES": "1"}, markers={"LLM_ROUTER_WORKER": "w1", "LLM_ROUTER_MODEL": "m"})
    assert env == {"PATH": "/usr/bin", "HOME": "/home/op", "LC_ALL": "C.UTF-8", "HF_HOME": "/data/hf",
                   "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "PYTHONUNBUFFERED": "1", "LLM_ROUTER_TEST_SESSION": "t0k",
                   "MY_SETTING": "on", "CUDA_VISIBLE_DEVICES": "1", "LLM_ROUTER_WORKER": "w1",
                   "LLM_ROUTER_MODEL": "m"}
    # the model's env wins over the inherited one (e.g. PATH of a virtualenv); markers win over both
    assert engine_env({"PATH": "/usr/bin"}, {"PATH": "/venv/bin", "LLM_ROUTER_WORKER": "x"},
                      markers={"LLM_ROUTER_WORKER": "w1"}) == {"PATH": "/venv/bin", "LLM_ROUTER_WORKER": "w1"}


def test_secret_names_are_words_not_substrings() -> None:
    for name in ("--api-key", "--api_key", "--hf-token", "--token", "--auth-token", "--admin-password",
                 "--client-secret", "HF_TOKEN", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "--apikey"):
        assert secret_name(name), name
    for name in ("--max-tokens", "--tokenizer", "--skip-tokenizer-init", "--ssl-keyfile", "--model", "--port",
                 "--max-num-batched-tokens", "--key-value-cache"):
        assert not secret_name(name), name


def test_redact_argv_masks_both_spellings_and_nothing_else() -> None:
    argv = ["vllm", "serve", "m", "--api-key", "sk-1", "--hf-token=hf_2", "--max-tokens", "16",
            "--use-auth-token", "--port", "8000", "--db-password", "p4ss"]
    assert redact_argv(argv) == ["vllm", "serve", "m", "--api-key", "***", "--hf-token=***", "--max-tokens",
                                 "16", "--use-auth-token", "--port", "8000", "--db-password", "***"]


def test_redactor_scrubs_a_models_secrets_from_free_text() -> None:
    from llm_lab_router.config import parse_config

    cfg = parse_config('[[models]]\nid = "m"\napi_key = "sk-model-key"\n'
                       'command = ["srv", "--api-key", "sk-flag-key", "--hf-token=hf_tok3n", "--port", "1234"]\n'
                       'env = { HF_TOKEN = "hf_env_tok", HF_HOME = "/data/hf" }\n')
    scrub = Redactor.for_model(cfg.models[0]).scrub
    line = "args: {'api_key': 'sk-flag-key', 'hf': 'hf_tok3n', 'k': 'sk-model-key', 'e': 'hf_env_tok'} /data/hf 1234"
    assert scrub(line) == "args: {'api_key': '***', 'hf': '***', 'k': '***', 'e': '***'} /data/hf 1234"
    assert Redactor([]).scrub(line) is line


def test_redact_url_hides_the_password_only() -> None:
    assert redact_url("redis://router:s3cret@db:6379/0") == "redis://router:***@db:6379/0"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# --------------------------------------------------------------------------- real worker, real engines

# Stands in for vLLM: prints its arguments (as ``non-default args``), then becomes the mock engine
# (everything after ``--``). With ``--fail`` it exits 1 instead, after printing.
WRAPPER = ("import os, sys; a = sys.argv[1:]; print('engine args:', a, flush=True); "
           "sys.exit(1) if '--fail' in a else os.execv(sys.executable, [sys.executable, *a[a.index('--') + 1:]])")
FLAG_KEY = "sk-flag-0123456789abcdef"
HF_TOKEN = "hf_tok_0123456789abcdef"
MODEL_KEY = "sk-model-0123456789abcdef"
SECRETS = (FLAG_KEY, HF_TOKEN, MODEL_KEY)


def secret_model(model_id: str, *extra: str) -> str:
    command = ["{python}", "-c", WRAPPER, "--api-key", FLAG_KEY, f"--hf-token={HF_TOKEN}", *extra, "--",
               str(MOCK_ENGINE), "--port", "{port}", "--host", "{host}", "--model", "{id}", "--quiet"]
    return model_block(model_id, command=command, api_key=MODEL_KEY, restart="no")


def test_engine_environment_has_no_worker_secrets(procs, redis_url, rds, tmp_path: Path) -> None:
    worker_url = role_url(redis_url, "worker", "w-env")
    password = worker_url.split("@")[0].rsplit(":", 1)[1]
    config = write_config(tmp_path / "env.toml", model_block("envy", auto_start=True)
                          + 'env = { MY_SETTING = "on-purpose" }\n')
    start_worker(procs, redis_url, config, "w-env",
                 env={"LLM_ROUTER_API_KEYS": "client-key-0123456789", "LLM_ROUTER_ADMIN_KEYS": "admin-key-0123456789",
                      "LLM_ROUTER_REDIS_URL": worker_url})

    def running() -> Instance | None:
        data = rds.hgetall(KEYS.instance("envy", "w-env"))
        inst = from_hash(data, Instance) if data else None
        return inst if inst and inst.state == "running" else None

    inst = wait_for(running, timeout=30, message="envy running")
    environ = psutil.Process(inst.pid).environ()  # what /proc/<pid>/environ shows
    assert "LLM_ROUTER_API_KEYS" not in environ and "LLM_ROUTER_ADMIN_KEYS" not in environ
    assert "LLM_ROUTER_REDIS_URL" not in environ
    assert not [k for k, v in environ.items() if password in v or "key-0123456789" in v]
    assert environ["MY_SETTING"] == "on-purpose" and environ["PATH"]
    assert environ["LLM_ROUTER_WORKER"] == "w-env" and environ["LLM_ROUTER_MODEL"] == "envy"
    assert {k for k in environ if k.startswith("LLM_ROUTER_")} <= {
        "LLM_ROUTER_WORKER", "LLM_ROUTER_NONCE", "LLM_ROUTER_MODEL", "LLM_ROUTER_TEST_SESSION",
        "LLM_ROUTER_SPEC_HASH", "LLM_ROUTER_PORT", "LLM_ROUTER_PROFILE"}  # the markers adoption reads back


def test_engine_secrets_are_masked_in_logs_replies_and_the_api(procs, redis_url, rds, tmp_path: Path) -> None:
    config = write_config(tmp_path / "secrets.toml", secret_model("keyed"), secret_model("doomed", "--fail"))
    worker = start_worker(procs, redis_url, config, "w-secret")
    router = start_router(procs, redis_url)
    wait_models(router, 2)

    started = request("POST", f"{router.url}/api/models/keyed/start", timeout=60)
    assert started.status == 200, started.body
    failed = request("POST", f"{router.url}/api/models/doomed/start", timeout=60)
    assert failed.status >= 400 and b"engine args" in failed.body, failed.body  # the log tail is quoted back
    info = request("GET", f"{router.url}/api/models/keyed/info")
    assert info.status == 200
    lines = [log_entry(f).message for model in ("keyed", "doomed") for _, f in rds.xrange(KEYS.logs(model))]
    starting = [m for m in lines if m.startswith("starting:")]
    assert len(starting) == 2 and all("--api-key '***'" in m and "--hf-token=***" in m for m in starting), starting
    assert any(m.startswith("engine args:") and "***" in m for m in lines), lines
    instances = [rds.hgetall(KEYS.instance(m, "w-secret")) for m in ("keyed", "doomed")]
    published = {
        "log stream": "\n".join(lines),
        "failed start reply": failed.body.decode(),
        "info API": info.body.decode(),
        "last_error": " ".join(i.get("last_error", "") for i in instances),
        "worker log": procs.log(worker),
    }
    leaks = [(where, s) for where, text in published.items() for s in SECRETS if s in text]
    assert not leaks, leaks


def test_config_check_masks_secret_flags(tmp_path: Path) -> None:
    config = write_config(tmp_path / "check.toml", secret_model("keyed"))
    done = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "config", "check", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "--api-key '***'" in done.stdout and "--hf-token=***" in done.stdout, done.stdout
    assert not [s for s in SECRETS if s in done.stdout + done.stderr]
