#!/usr/bin/env python3
"""How far ``llm_router/estimate.py`` is from what a real ``llama-server`` holds: the issue 29
table of estimate vs measured for GGUFs of several shapes made here.

Per model shape (scripts/make_tiny_gguf.py, random weights, one of them over 1 GiB) and per
``-c``: ``llama-server -m M -c C -ngl 0 -t 1 --parallel 1`` is started, and its memory is read
(psutil, /proc/PID/status) once it answers ``/health`` and again after one chat request. No GPU
is lent to this machine, so the engine runs on the CPU and host RAM stands in for VRAM: the
estimate compared is the one for the same arguments with every layer offloaded (what the model
would hold on a GPU: weights + KV cache + compute buffers), without the CUDA context a CPU
process does not have. The engine's own account (its ``... buffer size = N MiB`` log lines) is
printed beside both, which tells which part of a gap is the estimate's and which the process's
(the binary, its heap, threads, the tokenizer).

With mmap (llama.cpp's default, used here), the weights are file pages mapped into the process:
they count in its RSS as ``RssFile`` once touched (llama.cpp maps with ``MAP_POPULATE``, so at
load), the KV cache and compute buffers as ``RssAnon``. Usage::

    python scripts/bench_estimate.py --llama-server PATH [--dir /var/tmp] [--ctx 512,4096]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from llm_lab_router.estimate import CUDA_CONTEXT_MB, estimate_gguf
from llm_lab_router.redis_server import free_port
from make_tiny_gguf import Shape, write

MIB = 1 << 20
# name -> shape: the tiny test model, a small f32 one, a grouped-query f16 one, and one over 1 GiB
MODELS = {
    "tiny": Shape(),
    "small-f32": Shape(dim=512, heads=8, ff=1408, blocks=8, vocab=32000),
    "gqa-f16": Shape(dim=1024, heads=16, kv_heads=4, ff=2816, blocks=12, vocab=32000, f16=True),
    "large-f16": Shape(dim=2048, heads=16, ff=5632, blocks=10, vocab=32000, f16=True),
}
BUFFER = re.compile(r"\b(\w+)\s+(model|KV|compute|output) buffer size\s*=\s*([\d.]+) MiB")


def memory(pid: int) -> dict[str, int]:
    """MiB: total RSS, and its anonymous and file-backed parts."""
    out = {"rss": psutil.Process(pid).memory_info().rss // MIB}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) // 1024
    return out


def engine_buffers(log: str) -> dict[str, float]:
    """MiB per kind (model, KV, compute, output) from llama.cpp's own log lines."""
    out: dict[str, float] = {}
    for _, kind, mib in BUFFER.findall(log):
        out[kind] = out.get(kind, 0.0) + float(mib)
    return out


def wait_health(base: str, proc: subprocess.Popen, timeout: float = 300) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - began
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("llama-server did not become healthy")


def chat(base: str) -> str:
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4, "temperature": 0}
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


def measure(server: str, model: Path, ctx: int, log_path: Path) -> dict:
    port = free_port()
    args = ["-m", str(model), "-c", str(ctx), "-ngl", "0", "-t", "1", "--parallel", "1"]
    with open(log_path, "w") as log:
        # -lv 4: llama.cpp's info lines, among them its buffer sizes
        proc = subprocess.Popen([server, *args, "-lv", "4", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        load_s = wait_health(base, proc)
        loaded = memory(proc.pid)
        answer = chat(base)
        after = memory(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # the estimate for the same arguments, every layer offloaded: the model's memory, on a GPU
    est = estimate_gguf(model, [a for a in args if a not in ("-ngl", "0")] + ["-ngl", "999"])
    return {"args": args, "load_s": round(load_s, 2), "loaded": loaded, "after": after, "answer": answer,
            "engine": engine_buffers(log_path.read_text(errors="replace")),
            "estimate": {"weights": est.weights_mb, "kv": est.kv_mb, "compute": est.overhead_mb - CUDA_CONTEXT_MB,
                         "total": est.vram_mb - CUDA_CONTEXT_MB}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-server", required=True, help="the binary (scripts/build_llama_server.sh prints it)")
    p.add_argument("--dir", default=None, help="where the GGUFs go (a real disk)")
    p.add_argument("--ctx", default="512,4096", help="comma-separated -c values")
    p.add_argument("--models", default=",".join(MODELS), help=f"a subset of {','.join(MODELS)}")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    opts = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llm-router-estimate-", dir=opts.dir))
    rows = []
    try:
        for name in opts.models.split(","):
            path = work / f"{name}.gguf"
            write(str(path), shape=MODELS[name])
            size = path.stat().st_size / MIB
            for ctx in (int(c) for c in opts.ctx.split(",")):
                r = measure(opts.llama_server, path, ctx, work / f"{name}-{ctx}.log")
                r.update(model=name, ctx=ctx, file_mib=round(size, 1))
                rows.append(r)
                print(f"{name} -c {ctx}: {json.dumps(r)}", file=sys.stderr, flush=True)
            path.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| model (file) | -c | estimate: weights + KV + compute = total | llama.cpp's buffers: model + KV + "
          "compute | RSS loaded (anon + file) | RSS after a request (anon + file) | estimate vs RSS after |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        e, b, lo, af = r["estimate"], r["engine"], r["loaded"], r["after"]
        print(f"| {r['model']} ({r['file_mib']:.0f} MiB) | {r['ctx']} | {e['weights']} + {e['kv']} + {e['compute']} "
              f"= {e['total']} | {b.get('model', 0):.0f} + {b.get('KV', 0):.0f} + {b.get('compute', 0):.0f} "
              f"= {b.get('model', 0) + b.get('KV', 0) + b.get('compute', 0):.0f} | {lo['rss']} ({lo['RssAnon']} + "
              f"{lo['RssFile']}) | {af['rss']} ({af['RssAnon']} + {af['RssFile']}) | "
              f"{100 * (e['total'] - af['rss']) / af['rss']:+.0f}% |")
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
