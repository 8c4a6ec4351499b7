"""What the router tells operators: ``metrics`` (the Prometheus registry a router's parts count
into), ``cluster_metrics`` (gauges rendered from the cluster view at scrape time), ``accesslog``
(one JSON line per request, and the token usage read from an answer's tail).
"""
