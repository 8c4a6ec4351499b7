"""The router: one OpenAI-compatible endpoint and the management API, stateless, on Redis.

Sub-packages by concern, each importing only those below it (``tests/test_layering.py``):

- ``http``: the HTTP surface (routes, handlers, auth, input checks, response shapes, dashboard);
- ``services`` (wiring: builds every part from the options) and ``supervisor`` (``serve
  --workers N``: N router processes on one port);
- ``forward``: one forwarded OpenAI request (proxy, balancing, fallbacks, the engine client);
- ``control`` (starts, stops, swaps, the waiting line), ``limits`` (keys' limits, concurrency,
  quotas), ``logs`` (log streaming): side by side, none imports another;
- ``observe``: metrics and the access log, which every layer above counts into;
- ``core``: errors, options and the cluster view, the base of everything.
"""
