"""Desk rules named in the configuration: ``rules = ["module:callable"]``.

The rule types and the built-in checks are the risk core's
(``gateway.core.rules``); they are re-exported here, the path a desk's rule
module imports (see docs/rules.md). Loading a rule imports code, which the
core never does, so the loader lives here.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import import_module

from gateway.core.rules import DEFAULT_RULES, OrderCheck, Rule, RuleResult

__all__ = ["DEFAULT_RULES", "OrderCheck", "Rule", "RuleResult", "load_rule", "load_rules"]


def load_rule(spec: str) -> Rule:
    """Import ``"package.module:callable"``; raises ``ValueError`` saying what failed."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"rule {spec!r} must look like 'package.module:callable'")
    try:
        module = import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"rule {spec!r}: cannot import {module_name}: {exc}") from None
    except Exception as exc:
        raise ValueError(f"rule {spec!r}: importing {module_name} raised {exc!r}") from None
    rule = getattr(module, attr, None)
    if not callable(rule):
        raise ValueError(f"rule {spec!r}: {module_name} has no callable {attr}")
    # Its signature cannot be checked before it runs: a wrong one fails the
    # first validation, which answers INTERNAL and logs the traceback.
    loaded: Rule = rule
    return loaded


def load_rules(specs: Sequence[str]) -> tuple[Rule, ...]:
    """Every rule of ``specs``, in order; raises ``ValueError`` for the first that fails."""
    return tuple(load_rule(spec) for spec in specs)
