"""The command line: options and presets (full, ``--quick``, ``--smoke``), the run (cluster
up, sections, teardown whatever happens), the table and the JSON file."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .client import now
from .cluster import FAST, Cluster
from .context import Bench
from .procs import Procs, pin, raise_fd_limit
from .profile import profile
from .report import machine, table
from .sections import SECTIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="llm-router benchmarks: router vs direct calls to the same engine.")
    p.add_argument("--quick", action="store_true", help="shorter rounds (about 1 minute)")
    p.add_argument("--smoke", action="store_true", help="a few requests per section (a test, not a measure)")
    p.add_argument("--json", metavar="FILE", help="also write the table and every raw figure as JSON")
    p.add_argument("--compare", metavar="URL",
                   help="also load another OpenAI proxy pointed at the bench's fast engine (see --engine-port)")
    p.add_argument("--compare-model", metavar="NAME", help=f"model name the --compare proxy expects (default {FAST})")
    p.add_argument("--compare-key", metavar="KEY", help="Bearer key for the --compare proxy")
    p.add_argument("--engine-port", type=int, default=0, metavar="PORT",
                   help="port of the fast mock engine, so a --compare proxy can be configured for it")
    p.add_argument("--only", metavar="SECTIONS", default=",".join(SECTIONS),
                   help=f"comma-separated subset of: {','.join(SECTIONS)}")
    p.add_argument("--rounds", type=int, help="ABAB rounds per load")
    p.add_argument("--duration", type=float, help="measured seconds per round")
    p.add_argument("--concurrency", default="1,32,256", help="non-streamed concurrency levels")
    p.add_argument("--streams", type=int, help="concurrent streams in the many-streams test (default 1000)")
    p.add_argument("--log-rate", type=int, default=100_000, help="lines/s the chatty engine prints")
    p.add_argument("--viewers", type=int, help="concurrent log viewers in the viewers section (default 5000)")
    p.add_argument("--profile", metavar="FILE",
                   help="after the sections, py-spy router A under the chat c=32 load (.svg flame graph, "
                        ".json speedscope, else py-spy's raw collapsed stacks); use --only '' to profile alone")
    p.add_argument("--profile-seconds", type=float, default=15.0, metavar="S")
    p.add_argument("--pin", action="store_true",
                   help="pin the load generator to CPU 0 and every other process to the other CPUs")
    p.add_argument("--no-aof", action="store_true", help="run Redis without its append-only file")
    p.add_argument("--direct-only", action="store_true",
                   help="no Redis, worker or router: engines started directly (a self-check of the harness)")
    p.add_argument("--sched-gap", type=float, metavar="S",
                   help="scheduling, arrivals: mean seconds between sessions (default 6)")
    p.add_argument("--sched-workloads", default="agents,arrivals", metavar="LIST",
                   help="scheduling: which workloads to run (agents: closed loop; arrivals: open loop)")
    p.add_argument("--sched-residency", type=float, metavar="S", help="scheduling: min_residency (default 10)")
    p.add_argument("--sched-idle-release", type=float, default=0.0, metavar="S",
                   help="scheduling: idle_release (default 0: off, residency is never cut short)")
    p.add_argument("--sched-max-wait", type=float, metavar="S", help="scheduling: max_wait (default 18)")
    p.add_argument("--swap-mib", type=int, metavar="MIB", help="swap: size of each weight file (default 1024)")
    p.add_argument("--swap-residency", type=float, metavar="S", help="swap: min_residency of the loaded model (default 4)")
    p.add_argument("--swap-rounds", type=int, metavar="N", help="swap: rounds (default 2)")
    p.add_argument("--swap-dir", default="/var/tmp", metavar="DIR", help="swap: where the weight files go (a real disk)")
    p.add_argument("--llama-server", metavar="PATH",
                   help="swap: a real llama-server serves GGUFs of --swap-mib (else the mock engine reads its file)")
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (printed path)")
    opts = p.parse_args(argv)
    opts.concurrency = [int(c) for c in opts.concurrency.split(",") if c]
    opts.only = set(opts.only.split(",")) - {""}
    if opts.smoke:
        preset = dict(rounds=1, duration=0.25, warmup=0.05, prime=0.1, streams=50, stream_tokens=2, gap_tokens=5,
                      gap_duration=0.3, ramp=0.2, prop_cycles=1, log_window=0.5, log_probes=5,
                      viewers=50, viewer_samples=20, viewer_starts=1,
                      sched_duration=5.0, sched_delay=0.5, sched_residency=1.5, sched_max_wait=3.0, sched_clients=3,
                      sched_think=0.3, sched_gap=1.0, sched_arrivals_duration=5.0,
                      swap_mib=64, swap_residency=1.0, swap_rounds=1)
    elif opts.quick:
        preset = dict(rounds=2, duration=1.0, warmup=0.2, prime=0.5, streams=1000, stream_tokens=15, gap_tokens=25,
                      gap_duration=1.0, ramp=1.0, prop_cycles=4, log_window=2.0, log_probes=30,
                      viewers=5000, viewer_samples=200, viewer_starts=2,
                      sched_duration=30.0, sched_delay=3.0, sched_residency=10.0, sched_max_wait=18.0, sched_clients=6,
                      sched_think=0.5, sched_gap=6.0, sched_arrivals_duration=120.0,
                      swap_mib=512, swap_residency=3.0, swap_rounds=1)
    else:
        preset = dict(rounds=4, duration=2.0, warmup=0.3, prime=0.5, streams=1000, stream_tokens=15, gap_tokens=25,
                      gap_duration=2.0, ramp=1.0, prop_cycles=10, log_window=3.0, log_probes=100,
                      viewers=5000, viewer_samples=300, viewer_starts=3,
                      sched_duration=90.0, sched_delay=3.0, sched_residency=10.0, sched_max_wait=18.0, sched_clients=6,
                      sched_think=0.5, sched_gap=6.0, sched_arrivals_duration=360.0,
                      swap_mib=1024, swap_residency=4.0, swap_rounds=2)
    for k, v in preset.items():
        if getattr(opts, k, None) is None:
            setattr(opts, k, v)
    return opts


async def amain(opts: argparse.Namespace, procs: Procs, work: Path) -> dict[str, Any]:
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C: cancel everything, then tear down
        loop.add_signal_handler(sig, task.cancel)  # type: ignore[union-attr]
    cluster = Cluster(opts, procs, work)
    t_setup = now()
    await cluster.start()
    print(f"# set up in {now() - t_setup:.1f}s; fast engine at {cluster.urls[FAST]}"
          + (f", router A {cluster.routers[0].base} (pid {cluster.router_pids[0]}), router B "
             f"{cluster.routers[1].base} (pid {cluster.router_pids[1]})" if cluster.routers else ""),
          file=sys.stderr, flush=True)
    if opts.pin:
        pin(procs)
    bench = Bench(opts, cluster)
    t0 = now()
    for name, run in SECTIONS.items():
        if name in opts.only:
            await run(bench)
    if opts.profile:
        await profile(bench, opts.profile, opts.profile_seconds)
    procs.check_alive()
    columns = ["direct", *(["router"] if cluster.routers else []), *(["compare"] if opts.compare else []),
               *(["lru", "swap"] if "scheduling" in opts.only and cluster.routers else []),
               *(["cold", "prefetch"] if "swap" in opts.only else [])]
    return {"rows": bench.rows, "raw": bench.raw, "columns": columns, "seconds": now() - t0}


def _interrupted(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    fds = raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="llm-router-bench-"))
    procs = Procs(work)
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)  # also where SIGINT was inherited as ignored
    started = time.time()
    ok = False
    try:
        try:
            import uvloop

            result = uvloop.run(amain(opts, procs, work))
        except ImportError:
            result = asyncio.run(amain(opts, procs, work))
        ok = True
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        for name, _ in procs.procs:
            tail = procs.tail(name, 15)
            if tail:
                print(f"--- {name} (last lines) ---\n{tail}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        if opts.keep_logs or not ok:
            print(f"process logs: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    info = machine()
    mode = "smoke" if opts.smoke else "quick" if opts.quick else "full"
    print(f"\nllm-router benchmark ({mode}: {opts.rounds} rounds x {opts.duration:g}s, ABAB; "
          f"{info['cpus']} CPUs {info['cpu']}; Python {info['python']}; fd limit {fds}"
          + ("; pinned" if opts.pin else "") + ")")
    print(table(result["rows"], result["columns"]))
    failed = [r for r in result["rows"] if r.ok is False]
    total_errors = sum(sum(r.errors.values()) for r in result["rows"])
    print(f"\n{len(failed)} target(s) missed; {total_errors} error(s); measured in {result['seconds']:.0f}s, "
          f"{time.time() - started:.0f}s in all")
    if opts.json:
        Path(opts.json).write_text(json.dumps({
            "machine": info, "options": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(opts).items()},
            "columns": result["columns"], "rows": [dataclasses.asdict(r) for r in result["rows"]],
            "errors": total_errors, "raw": result["raw"],
        }, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
