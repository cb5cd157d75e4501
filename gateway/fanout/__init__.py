"""Push channels and per-connection output (docs/protocol.md section 5).

- ``channels``: ``Fanout``, the channels: seq, resume buffers, audiences,
  snapshots, heartbeats, exposure coalescing (with ``exposure`` and
  ``resume``). It reads the risk state through the narrow ``RiskReader``.
- ``outbox``: ``Outbox``, one per connection, and ``Delivery``, what a frame
  is; the slow-consumer rule.
- ``charts``: ``ChartHistory``, the last 15 minutes of exposure pushes and
  decision counts that ``history.get`` answers.
- ``flusher``: ``Flusher``, one per gateway, writing broadcasts a slice of
  connections per loop turn; ``text_frame``, the framing.

Writes to a connection go through ``gateway.net.wsio``.
"""

from gateway.fanout.channels import SEQ_CHANNELS, STAFF_ONLY, Fanout, RiskReader, Subscriber
from gateway.fanout.flusher import Flusher, framed_size, text_frame
from gateway.fanout.outbox import Delivery, Outbox

__all__ = [
    "SEQ_CHANNELS",
    "STAFF_ONLY",
    "Delivery",
    "Fanout",
    "Flusher",
    "Outbox",
    "RiskReader",
    "Subscriber",
    "framed_size",
    "text_frame",
]
