"""The base every layer of the router shares, importing no other part of it.

``errors`` (``ApiError``, the error shapes on the wire, ``WaitReason``), ``responses`` (the
API's success shapes: the manual's contract, also what ``/openapi.json`` publishes), ``options`` (every
tunable of a router, from the CLI and the environment), ``view`` (``ClusterView``: the in-memory
copy of what Redis says about every worker, instance, device and catalog entry).
"""
