"""The framing the flusher and the outbox write straight to the transport."""

from __future__ import annotations

import random

import pytest
from websockets.frames import Frame, Opcode

from gateway.fanout import framed_size, text_frame


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_when_any_length_then_same_bytes_as_websockets(length: int) -> None:
    payload = bytes(random.Random(length).randrange(32, 127) for _ in range(length))
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    assert text_frame(payload) == expected
    # What the writer task counts for a frame websockets frames itself.
    assert framed_size(length) == len(expected)
