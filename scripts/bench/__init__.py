"""The benchmark suite: the router measured side by side with direct calls to the same engine.

    ./dev.sh bench                 # full run (< 5 min): prints the table
    ./dev.sh bench --quick         # about 1 min
    ./dev.sh bench --smoke         # a few requests per section (the test suite runs this)
    ./dev.sh bench --json out.json # also write every raw figure
    ./dev.sh bench --compare http://127.0.0.1:4000 --engine-port 18001   # + another proxy
    python -m scripts.bench --quick   # the same program (./dev.sh bench runs scripts/bench.py)

It starts everything it needs — a private redis-server, one worker whose models are mock
engines (``scripts/mock_engine.py``), two routers — measures, stops every process it started
(process groups; also on Ctrl-C or an error) and prints one table: metric, direct, router,
delta or ratio, target, verdict.

Method (docs/BENCHMARKS.md says more):

* **Side by side.** Every "router" figure has a "direct" twin measured in the same run
  against the *same engine process* (the instance URL the router itself publishes), so the
  delta holds on a noisy machine.
* **ABAB.** Each load is run in several short rounds, direct and router alternating (the order
  flips every round); a round is a warm-up followed by a measured window, on connections
  opened before the clock starts. Reported values are medians over rounds; deltas and ratios
  are medians of the *paired* per-round deltas / ratios.
* **A lean load generator.** A raw HTTP/1.1 keep-alive client on asyncio (uvloop) protocols:
  no per-request allocations beyond the response record, so the generator, which shares the
  machine's cores with the router and the engine, stays the cheapest process of the three.
  It runs in this process, never in the router's or the engine's.

Only what the project ships is needed (tornado, redis, msgspec, psutil; uvloop if present).

Modules, one concern each: ``client`` (the load generator's HTTP/1.1 client), ``load``
(closed loops and ABAB rounds), ``stats`` (percentiles, one run's figures), ``procs`` (the
processes it starts), ``cluster`` (Redis, worker, routers and engines), ``report`` (rows, the
table, the machine), ``sections`` (what is measured, one module per section), ``cli``
(options, the run, the output).
"""
