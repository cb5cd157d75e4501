"""The risk core: pure and synchronous.

``RiskEngine`` (``gateway.core.engine``) takes checked requests and the time
(``now_ms``, milliseconds since the epoch: an input, never read from a clock),
changes its state in one step, and queues what it produced: typed journal
records (``gateway.core.records``) and typed events (``gateway.core.events``).
It never awaits, reads a file or a socket, so a check and the reservation
that follows it cannot interleave with another request.

Modules here import ``protocol`` and pure parts of the standard library only
(``tests/core/test_purity.py`` checks it); everything slow lives in the shell
around the engine.
"""
