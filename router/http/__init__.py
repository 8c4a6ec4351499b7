"""The HTTP surface: ``routes`` (every route, declared once: the application, each route's access
and the OpenAPI document are derived from it), ``app`` (the Tornado application, the server and
``serve``'s main), ``handlers`` (the API's handlers, thin), ``exchange`` (the one pipeline of a
forwarded request, below Tornado's web layer), ``slowbody`` (header and body timeouts), ``auth`` (API keys and roles),
``query`` + ``validate`` (query parameters and hostile paths), ``openapi`` (``/openapi.json``), ``dashboard`` (+ ``static/``), ``debug``.
"""
