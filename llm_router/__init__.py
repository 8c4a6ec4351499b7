"""llm-router: shared pieces of the router and the worker (wire protocol, config, CLI)."""

__version__ = "0.1.0"
