"""The documentation holds: its links resolve, and its curl examples answer as shown.

- Every relative link and ``#anchor`` of README.md and docs/*.md points at a file of the
  repository and, for a Markdown target, at a heading it has (GitHub's anchor slugs).
- Every ``curl`` example of README.md and docs/api.md runs, with real ``curl``, against the
  demo ``llm-router up`` serves (examples/models.toml: a real worker and router, the mock
  engines) — host and port substituted, nothing else — in the document's order, and answers
  the status the document states (a ``# status NNN`` comment, else 200) and, where the
  document shows an answer, one with the same keys. An example that cannot run verbatim is
  marked ``<!-- not-run: reason -->`` just above its block.
- Every model config (a ``toml`` block with ``[[models]]``) of README.md and docs/*.md passes
  ``llm-router config check --portable``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import MOCK_ENGINE, ROOT, Processes
from helpers import STACK_WORKER, start_router, start_worker, wait_models, write_config
from markdown_docs import CurlExample, anchors, blocks_and_prose, curl_examples, links, read

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLE_DOCS = ["README.md", "docs/api.md"]
DOC_BASES = ("$B", "http://localhost:8000", "http://127.0.0.1:8000")  # what the examples call the router
DOC_WORKER = "vm"  # the worker id in the documents' sample answers (a key of /api/devices/info's `hosts`)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
HEADER_LINE = re.compile(r"^([A-Za-z][\w-]*): ")
JSON_KEY = re.compile(r'"((?:[^"\\]|\\.)+)"\s*:')


# --------------------------------------------------------------------------- links


def broken_links(doc: Path) -> list[str]:
    """``file:line: target: why`` for each relative link of ``doc`` that does not resolve."""
    bad = []
    for line, target in links(read(doc)):
        if SCHEME.match(target):
            continue  # http(s):, mailto: ...: not ours to check offline
        path, _, fragment = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        where = f"{doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc.name}:{line}: {target}"
        if not dest.exists():
            bad.append(f"{where}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(read(dest)):
            bad.append(f"{where}: no heading with that anchor in {dest.name}")
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(doc: Path) -> None:
    assert not (bad := broken_links(doc)), "\n".join(bad)


def test_anchors_are_githubs_slugs() -> None:
    text = ("# One router, every core: `--workers N`\n## Placement, eviction, idle unload, limits\n"
            "## [Links](x.md) and *emphasis*\n## Twice\n## Twice\n```bash\n# not a heading\n```\n")
    assert anchors(text) == {"one-router-every-core---workers-n", "placement-eviction-idle-unload-limits",
                             "links-and-emphasis", "twice", "twice-1"}


def test_a_broken_link_or_anchor_is_reported(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Present\n")
    doc = tmp_path / "doc.md"
    doc.write_text("[ok](other.md#present) [ok](#here) [web](https://example.com/x)\n"
                   "# Here\n[gone](missing.md) [bad](other.md#absent) [self](#nowhere)\n"
                   "`[code](not-a-link.md)` [`code text`](other.md) [wrapped\nlink](also-missing.md)\n"
                   "```md\n[in a block](ignored.md)\n```\n[ref]: missing-too.md\n")
    assert [b.split(": ", 1)[1] for b in broken_links(doc)] == [
        "missing.md: no such file", "other.md#absent: no heading with that anchor in other.md",
        "#nowhere: no heading with that anchor in doc.md", "also-missing.md: no such file",
        "missing-too.md: no such file"]


def test_every_model_config_in_the_docs_passes_config_check(tmp_path: Path) -> None:
    """A ``toml`` block with ``[[models]]`` in README.md or docs/*.md is a config a reader will
    copy: ``llm-router config check --portable`` accepts it (paths and programs of another host
    are not checked)."""
    files = []
    for doc in DOCS:
        blocks, _ = blocks_and_prose(read(doc))
        for block in blocks:
            text = textwrap.dedent("\n".join(block.lines))
            if block.lang == "toml" and "[[models]]" in text:
                files.append(tmp_path / f"{doc.stem}-line{block.line}.toml")
                files[-1].write_text(text)
    assert len(files) >= 3
    done = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "config", "check", "--portable",
                           *map(str, files)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------- curl examples


def demo_config(tmp_path: Path) -> Path:
    """examples/models.toml as ``up`` serves it, with the test's private ports and fast
    heartbeats (its models, aliases and engines untouched), and the mock engine's absolute
    path (the copy lives elsewhere)."""
    text = read(ROOT / "examples" / "models.toml")
    relative = "{config_dir}/../scripts/mock_engine.py"
    assert relative in text and text.startswith("#") and "\n[worker]\n" in text
    models = text[text.index("\n[[models]]"):].replace(relative, str(MOCK_ENGINE))
    config = write_config(tmp_path / "models.toml")  # its [worker] table: private ports, fast heartbeats
    config.write_text(config.read_text() + models)
    return config


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: str


def run_curl(example: CurlExample, base: str, tmp_path: Path) -> Answer:
    """The example's own curl command (host and port substituted), with its output options
    replaced by files of ours and a time limit (a log stream never ends by itself)."""
    argv: list[str] = []
    words = iter(example.argv)
    for word in words:
        if word in ("-o", "--output", "-D", "--dump-header"):
            next(words)  # where the document sends the output: ours goes to files below
            continue
        for doc_base in DOC_BASES:
            word = word.replace(doc_base, base)
        argv.append(word)
    body, head = tmp_path / "body", tmp_path / "head"
    limit = "2" if "/logs/stream" in example.command else "60"  # a stream's history comes at once; 2 s: a loaded CI
    done = subprocess.run([*argv, "-sS", "-o", str(body), "-D", str(head), "-w", "%{http_code}",
                           "--max-time", limit], capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode in (0, 28), f"{example.where}: curl failed: {done.stderr}"  # 28: our time limit
    blocks = head.read_text(errors="replace").strip().split("\r\n\r\n")
    headers = {}
    for line in blocks[-1].splitlines()[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(done.stdout), headers, body.read_text(errors="replace"))


def all_keys(value: Any) -> set[str]:
    """Every object key anywhere in a decoded JSON value."""
    if isinstance(value, dict):
        return set(value).union(*(all_keys(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(all_keys(v) for v in value))
    return set()


def shape_differences(shown: Any, got: Any, worker: str, path: str = "") -> list[str]:
    """Where the answer's keys differ from the document's: the same keys in every object
    (the document's worker id stands for the test's); lists compared by their first items."""
    if isinstance(shown, dict):
        if not isinstance(got, dict):
            return [f"{path or '.'}: the document shows an object, the answer has {json.dumps(got)[:80]}"]
        renamed = {worker if key == DOC_WORKER else key: value for key, value in shown.items()}
        out = [f"{path}.{key}: missing from the answer" for key in sorted(set(renamed) - set(got))]
        out += [f"{path}.{key}: in the answer, not in the document" for key in sorted(set(got) - set(renamed))]
        for key in sorted(set(renamed) & set(got)):
            out += shape_differences(renamed[key], got[key], worker, f"{path}.{key}")
        return out
    if isinstance(shown, list) and isinstance(got, list) and shown and got:
        return shape_differences(shown[0], got[0], worker, f"{path}[0]")
    return []


def doc_keys(text: str) -> set[str]:
    """The keys a (possibly abridged: ``...``) JSON text shows."""
    try:
        return all_keys(json.loads(text))
    except ValueError:
        return set(JSON_KEY.findall(text))


def sse_data(body: str) -> list[str]:
    return [line[5:].strip() for line in body.splitlines() if line.startswith("data:")]


def answer_problems(example: CurlExample, answer: Answer, worker: str) -> list[str]:
    """What in the answer contradicts the document: the status, then the shape it shows."""
    if answer.status != example.status:
        return [f"status {answer.status}, the document says {example.status}: {answer.body[:300]}"]
    shown = [line.strip() for line in example.shown if line.strip() and line.strip() != "..."]
    if not shown:
        return []
    if all(HEADER_LINE.match(line) and not line.startswith(("data:", "id:")) for line in shown):
        return [f"no {name} header" for line in shown
                if (name := HEADER_LINE.match(line).group(1)).lower() not in answer.headers]  # type: ignore[union-attr]
    if any(line.startswith(("data:", "id:")) for line in shown):  # an event stream
        problems = []
        got = set().union(*(all_keys(json.loads(d)) for d in sse_data(answer.body) if d.startswith("{")))
        for data in (line[5:].strip() for line in shown if line.startswith("data:")):
            if data == "[DONE]":
                problems += [] if "[DONE]" in sse_data(answer.body) else ["no data: [DONE]"]
            elif missing := doc_keys(data) - got:
                problems.append(f"event keys {sorted(missing)} of `{data[:60]}` in no event of the answer")
        if any(line.startswith("id:") for line in shown) and not re.search(r"^id: ", answer.body, re.MULTILINE):
            problems.append("no id: lines")
        return problems
    text = " ".join(shown)
    try:
        got = json.loads(answer.body)
    except ValueError:
        return [f"the document shows JSON, the answer is not: {answer.body[:200]}"]
    try:
        return shape_differences(json.loads(text), got, worker)
    except ValueError:  # abridged in the document: its keys must all be in the answer
        missing = doc_keys(text) - {worker if k == DOC_WORKER else k for k in all_keys(got)} - {DOC_WORKER}
        return [f"keys {sorted(missing)} shown but not in the answer"] if missing else []


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on PATH (CI installs it: .ci/run)")
@pytest.mark.parametrize("doc", EXAMPLE_DOCS)
def test_every_curl_example_answers_as_documented(doc: str, procs: Processes, redis_url: str,
                                                  tmp_path: Path) -> None:
    examples = curl_examples(doc, read(ROOT / doc))
    runnable = [e for e in examples if not e.not_run]
    assert len(runnable) >= 5, f"{doc}: curl examples expected, found {len(runnable)}"
    start_worker(procs, redis_url, demo_config(tmp_path), STACK_WORKER)
    router = start_router(procs, redis_url)
    wait_models(router, 2, timeout=30)
    failures = []
    for example in runnable:
        problems = answer_problems(example, run_curl(example, router.url, tmp_path), STACK_WORKER)
        failures += [f"{example.where}: {example.command[:90]}: {p}" for p in problems]
    assert not failures, "\n".join(failures)


def test_the_example_parser_reads_console_and_bash_blocks() -> None:
    text = ("```console\n$ curl $B/health\n{\"status\":\"healthy\"}\n"
            "$ curl -X POST \"$B/api/x?wait=false\" \\\n    -H 'A: b'   # status 202\n{\"success\":true}\n```\n"
            "<!-- not-run: needs a real engine -->\n\n```bash\ncurl http://localhost:8000/v1/x | grep X\n"
            "llm-router up\n```\n```bash\ncurl -N http://localhost:8000/y  # a comment\n```\n")
    found = curl_examples("t.md", text)
    assert [(e.line, e.argv, e.status, e.shown, e.piped, e.not_run) for e in found] == [
        (2, ["curl", "$B/health"], 200, ['{"status":"healthy"}'], False, ""),
        (4, ["curl", "-X", "POST", "$B/api/x?wait=false", "-H", "A: b"], 202, ['{"success":true}'], False, ""),
        (11, ["curl", "http://localhost:8000/v1/x"], 200, [], True, "needs a real engine"),
        (15, ["curl", "-N", "http://localhost:8000/y"], 200, [], False, "")]
