"""One forwarded OpenAI request: ``proxy`` (choose a model, its fallbacks and an instance, take a
slot, relay the answer), ``balancer`` + ``affinity`` (which instance: prefix affinity, fewest
outstanding), ``fallbacks`` (the chain), ``upstream`` (the pooled HTTP/1.1 client to engines),
``loading_stream`` (keep-alives while a model starts; ``Sink``, where an answer goes),
``json_depth`` (the body-nesting check).
"""
