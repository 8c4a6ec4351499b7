"""The HTTP surface: ``app`` (the Tornado application, the server and ``serve``'s main), ``handlers``
(the API's handlers, thin), ``exchange`` (the raw pipeline of a forwarded request, before Tornado's
body buffering), ``slowbody`` (header and body timeouts), ``auth`` (API keys and roles),
``query`` + ``validate`` (query parameters and hostile paths), ``openapi`` (``/openapi.json``), ``dashboard`` (+ ``static/``), ``debug``.
"""
