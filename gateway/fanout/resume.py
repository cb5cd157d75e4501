"""One seq'd channel: its seq and the buffer of its last events, for ``resume``."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

from protocol.codec import encode_push
from protocol.codes import Channel

__all__ = ["ChannelLog", "LoggedEvent"]


@dataclass(slots=True)
class LoggedEvent:
    """One event of a channel: its seq, who may see it and its push frame.

    ``audience``: None (everyone on the channel), an account name (whoever
    may read that account), or ``channels.STAFF_ONLY``. ``frame`` is None
    until first needed: an event nobody was subscribed to live is encoded
    only if a resume asks for it.
    """

    seq: int
    audience: str | None
    data: Mapping[str, Any]
    frame: bytes | None = None


class ChannelLog:
    """A channel's seq (+1 per event, from 1) and its last ``size`` events."""

    __slots__ = ("_events", "channel", "seq")

    def __init__(self, channel: Channel, size: int) -> None:
        self.channel = channel
        #: The seq of the last event (0 before the first).
        self.seq = 0
        self._events: deque[LoggedEvent] = deque(maxlen=size)

    def append(self, data: Mapping[str, Any], audience: str | None, *, encode: bool) -> LoggedEvent:
        """Number the next event and keep it; ``encode``: build its frame now."""
        self.seq += 1
        event = LoggedEvent(self.seq, audience, data)
        if encode:
            event.frame = encode_push(self.channel.value, event.seq, data)
        self._events.append(event)
        return event

    def frame(self, event: LoggedEvent) -> bytes:
        """The push of ``event``, encoded once."""
        frame = event.frame
        if frame is None:
            frame = event.frame = encode_push(self.channel.value, event.seq, event.data)
        return frame

    def since(self, resume: int) -> list[LoggedEvent] | None:
        """The events after seq ``resume``, oldest first; None when the buffer
        no longer holds all of them, or ``resume`` is past the current seq
        (a seq from an earlier run of the gateway)."""
        if resume > self.seq:
            return None
        if resume == self.seq:
            return []
        events = self._events
        if not events or events[0].seq > resume + 1:
            return None
        return list(islice(events, resume + 1 - events[0].seq, None))
