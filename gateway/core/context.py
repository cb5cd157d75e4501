"""The exact decimal context every risk computation runs in.

``protocol.values.RISK_CONTEXT`` cannot round any value the protocol accepts.
Entry points of the engine are wrapped in ``exact``, so a library host that
keeps Python's default 28 digits still gets exact risk math, and its own
context is left as it was.
"""

from __future__ import annotations

import decimal
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from protocol.values import RISK_CONTEXT

_P = ParamSpec("_P")
_R = TypeVar("_R")

# Module-level aliases: exact() wraps every validation, so each lookup counts.
_getcontext = decimal.getcontext
_setcontext = decimal.setcontext
_copy_risk_context = RISK_CONTEXT.copy
# The context install_risk_context() made current, if any.
_installed: decimal.Context | None = None


def exact(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run a public entry point in the exact decimal context, whatever the
    caller's own context is (a library host may keep Python's default 28 digits).

    What ``decimal.localcontext(RISK_CONTEXT)`` does (a fresh copy, restored
    afterwards), without the context manager's cost: this wraps every
    validation. Internal calls between entry points use undecorated methods
    instead of nesting it. In a process that installed the risk context
    (``install_risk_context``, the gateway server) there is nothing to swap.
    """

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        caller = _getcontext()
        if caller is _installed:
            return method(*args, **kwargs)
        _setcontext(_copy_risk_context())
        try:
            return method(*args, **kwargs)
        finally:
            _setcontext(caller)

    return wrapper


def install_risk_context() -> decimal.Context:
    """Make a copy of the exact risk context this thread's decimal context.

    For a process whose decimal arithmetic is all risk math (the gateway
    server calls it before its event loop starts, so every task inherits it):
    the engine's entry points then skip their per-call context swap (about
    0.8 us each). A library host that keeps its own context need not call it;
    the entry points swap as before. Nothing may change the installed
    context's settings afterwards.
    """
    global _installed
    context = _copy_risk_context()
    _setcontext(context)
    _installed = context
    return context


_A = TypeVar("_A")


def own_context(check: Callable[[_A], _R]) -> Callable[[_A], _R]:
    """``check`` run in a fresh copy of the risk context: whatever it does to
    the decimal context ends with the call, even where the context is
    installed and shared (``install_risk_context``). For a desk's own rule."""

    @functools.wraps(check)
    def isolated(argument: _A) -> _R:
        caller = _getcontext()
        _setcontext(_copy_risk_context())
        try:
            return check(argument)
        finally:
            _setcontext(caller)

    return isolated
