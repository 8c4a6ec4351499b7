"""Models whose start failed recently, skipped for a while by on-demand starts.

A model that fails its health check (a broken config, a missing file, no GPU) fails the same
way on the next request. Retrying it at once costs every request a whole ``startup_timeout``
and, through the scheduler, may evict a model that was serving. So a failed on-demand start
puts the model in back-off for ``start_backoff`` seconds in this router: requests for it are
answered at once (503 ``model_start_failed``, the reason ``backoff`` with its end as ``eta``),
or served by a fallback. An explicit ``POST /api/models/{alias}/start`` is not held back (an
operator who fixed the cause retries); a success ends the back-off.
"""

from __future__ import annotations

from llm_lab_router.clock import CLOCK
from llm_lab_router.router.core.errors import WaitReason


class StartBackoff:
    """The failed starts of one router, each until its back-off ends (on the deployment's clock,
    like every ``eta``)."""

    def __init__(self, period: float) -> None:
        self.period = period
        self._until: dict[str, tuple[float, str]] = {}  # model -> (unix time it ends, the failure)

    def failed(self, model: str, message: str, now: float | None = None) -> None:
        self._until[model] = ((CLOCK.now() if now is None else now) + self.period, message)

    def succeeded(self, model: str) -> None:
        self._until.pop(model, None)

    def reason(self, model: str, now: float | None = None) -> WaitReason | None:
        """Why ``model`` is not started now (``kind`` ``backoff``), or ``None``."""
        got = self._until.get(model)
        if got is None:
            return None
        now = CLOCK.now() if now is None else now
        until, message = got
        if until <= now:
            del self._until[model]
            return None
        first_line = message.split("\n", 1)[0]
        return WaitReason(kind="backoff", eta=until,
                          message=f"model '{model}' failed to start {now - until + self.period:.0f}s ago "
                                  f"({first_line}); not started again for {until - now:.0f}s")
