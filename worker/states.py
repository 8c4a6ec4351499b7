"""The state machine of a model process, as data: which state may follow which.

``ModelProcess`` documents its states in a table (worker/process.py); this module is that
table in a form the code enforces: every change of ``Instance.state`` goes through
``check_transition``, so a bug that would publish an impossible sequence (``stopping`` → ``starting`` ...) fails loudly where it happens
instead of misleading every router that reads the instance. Routers never need it: they only
read states.
"""

from __future__ import annotations

from typing import Mapping

from llm_lab_router.protocol import State

TRANSITIONS: Mapping[State, frozenset[State]] = {
    "stopped": frozenset({"starting",  # a start
                          "running"}),  # adoption: a healthy engine a previous worker left running
    "starting": frozenset({"running",  # healthy
                           "failed",  # no room, spawn error, exit or timeout during start-up
                           "stopping"}),  # a stop cancels the start
    "running": frozenset({"stopping",  # a stop
                          "failed"}),  # the process exited by itself
    "stopping": frozenset({"stopped"}),
    "failed": frozenset({"starting",  # a start, or the restart policy
                         "stopped"}),  # a stop clears the failure
}


class IllegalTransition(RuntimeError):
    """A change of state the table does not allow: a bug in the supervisor."""


def check_transition(old: State, new: State | None) -> None:
    """Refuse ``old`` → ``new`` unless ``TRANSITIONS`` allows it. ``None`` (no state in the
    change) and ``new == old`` (other fields changed) are no transition."""
    if new is not None and new != old and new not in TRANSITIONS[old]:
        raise IllegalTransition(f"model process state {old} -> {new} is not allowed")
