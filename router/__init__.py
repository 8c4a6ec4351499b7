"""The router: one OpenAI-compatible endpoint and the management API, stateless, on Redis.

One module per concern: ``view`` (the in-memory cluster view), ``balancer`` (which instance),
``control`` (commands to workers), ``upstream`` + ``proxy`` (OpenAI forwarding), ``logstream``
(SSE log follow) + ``logfanout`` (one reader per watched model, fanned out to its viewers),
``manage`` (management API logic), ``devices`` (the cluster's device summaries), ``responses``
(response shapes and errors), ``options`` (tunables), ``query`` (query parameters), ``services``
(wiring), ``handlers`` + ``app`` (HTTP).
"""
