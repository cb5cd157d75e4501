"""The bytes on disk: file names, segment headers, record frames, snapshot files.

No I/O here: encoders return bytes, checkers take bytes. All integers are
little-endian.

Segment header, 20 bytes, written and fdatasync'ed (plus a directory fsync) before
the first frame goes in::

    b"RGJ1" | u32 version=2 | u64 first_seq | u32 crc32(previous 16 bytes)

After it come frames, one per group-commit batch (a batch whose payload would exceed
``MAX_FRAME_BYTES`` is split over several). A frame is 21 bytes of header then the
payload::

    u8 magic=0xA5 | u32 length | u32 crc32 | u64 first_seq | u32 count | payload[length]

The payload is a JSON array of ``count`` (at least one) orjson-encoded objects, the
records ``first_seq``, ``first_seq + 1``, ... ``first_seq + count - 1`` in order, so
every record has its own sequence number. ``crc32`` is ``zlib.crc32`` over
``first_seq``, ``count`` and the payload (the bytes that follow it) and checks every
record of the frame; ``length`` is checked by the CRC indirectly, since a wrong length
moves the range the CRC covers. A frame is the unit of checking: recovery keeps or
drops whole frames. Framing and decoding per batch rather than per record is what
keeps recovery fast. The magic is non-zero so that a zero-filled tail (a file that
grew before its data landed) never parses as a frame; note that ``zlib.crc32(b"") ==
0``, which is why the magic alone carries that guarantee. Frames in a segment carry
the records ``first_seq``, ``first_seq + 1``, ... of the segment with no gaps.

Snapshot file (version 2), 32 bytes of header, a checksum per 64 KiB block, the payload::

    b"RGS1" | u32 version=2 | u64 seq | u64 length | u32 block=65536 | u32 crc32(28 bytes)
    u32 crc32 of each block of the payload | u32 crc32 of those | payload[length]

so damage is reported at the block that holds it; ``seq`` must match the file name.
Version 1 (read still): ``b"RGS1" | u32 1 | u64 seq | u64 length | u32 crc32`` of the
first 24 header bytes and the payload, then the payload.
"""

from __future__ import annotations

import re
import struct
import zlib
from typing import Any, Final

import orjson

from gateway.persistence.errors import Damage

__all__ = [
    "CRC_START",
    "FRAME_HEADER",
    "FRAME_HEADER_BYTES",
    "FRAME_MAGIC",
    "MAX_FRAME_BYTES",
    "MAX_RECORD_BYTES",
    "SEGMENT_HEADER_BYTES",
    "SEGMENT_RE",
    "SNAPSHOT_HEADER_BYTES",
    "SNAPSHOT_RE",
    "TMP_SUFFIX",
    "encode_frames",
    "frame_error",
    "parse_snapshot",
    "segment_header",
    "segment_header_error",
    "segment_name",
    "snapshot_bytes",
    "snapshot_name",
]

SEGMENT_VERSION: Final = 2  # 2: one frame of records per batch; 1 had a frame per record
SNAPSHOT_VERSION: Final = 2  # 2: a checksum per block; 1 (still read) had one in all
SEGMENT_MAGIC: Final = b"RGJ1"
SNAPSHOT_MAGIC: Final = b"RGS1"
FRAME_MAGIC: Final = 0xA5
# A length above this is treated as a corrupt length field rather than a frame, so a
# flipped high bit cannot make recovery swallow the rest of the file as one payload.
# The writer splits a batch over several frames rather than exceed it.
MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
# One record alone must fit in a frame: its JSON plus the array's brackets.
MAX_RECORD_BYTES: Final = MAX_FRAME_BYTES - 2

_SEGMENT_HEADER = struct.Struct("<4sIQI")
FRAME_HEADER: Final = struct.Struct("<BIIQI")
_FRAME_TAIL = struct.Struct("<QI")  # first_seq, count: the CRC-covered part of the header
_SNAPSHOT_HEADER = struct.Struct("<4sIQQI")  # version 1
# Version 2: magic, version, seq, length, block size, crc32 of the 28 bytes before.
_SNAPSHOT_HEADER_V2 = struct.Struct("<4sIQQII")
SNAPSHOT_BLOCK_BYTES: Final = 64 * 1024
SEGMENT_HEADER_BYTES: Final = _SEGMENT_HEADER.size  # 20
FRAME_HEADER_BYTES: Final = FRAME_HEADER.size  # 21
SNAPSHOT_HEADER_BYTES: Final = _SNAPSHOT_HEADER.size  # 28
# Offset inside a frame header where the CRC-covered bytes (first_seq, count, payload)
# start.
CRC_START: Final = 9

SEGMENT_RE: Final = re.compile(r"journal-(\d{20})\.log")
SNAPSHOT_RE: Final = re.compile(r"snapshot-(\d{20})\.snap")
TMP_SUFFIX: Final = ".tmp"


def segment_name(first_seq: int) -> str:
    """The file name of the segment whose first record is ``first_seq``."""
    return f"journal-{first_seq:020d}.log"


def snapshot_name(seq: int) -> str:
    """The file name of the snapshot of the state as of record ``seq``."""
    return f"snapshot-{seq:020d}.snap"


# --------------------------------------------------------------------------- segments


def segment_header(first_seq: int) -> bytes:
    """The 20-byte header of the segment starting at ``first_seq``."""
    head = _SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, first_seq, 0)
    return head[:16] + zlib.crc32(head[:16]).to_bytes(4, "little")


def segment_header_error(data: bytes, first_seq: int) -> str | None:
    """Why ``data`` does not start with the header of a segment named for
    ``first_seq`` (None: it does)."""
    if len(data) < SEGMENT_HEADER_BYTES:
        return "truncated segment header"
    magic, version, head_seq, crc = _SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC:
        return "bad segment magic"
    if zlib.crc32(memoryview(data)[:16]) != crc:
        return "segment header checksum mismatch"
    if version != SEGMENT_VERSION:
        return f"unsupported segment version {version}"
    if head_seq != first_seq:
        return f"segment header says first seq {head_seq}, name says {first_seq}"
    return None


# --------------------------------------------------------------------------- frames


def encode_frames(bodies: list[bytes], first_seq: int) -> list[bytes]:
    """The frames holding encoded records ``bodies`` (seqs from ``first_seq``), as pieces
    to join: one frame, unless the payload would exceed ``MAX_FRAME_BYTES``."""
    pieces: list[bytes] = []
    if sum(map(len, bodies)) + len(bodies) + 1 <= MAX_FRAME_BYTES:
        _frame(pieces, bodies, first_seq)
        return pieces
    start = 0
    size = 1  # the payload's size so far: "[", and each body with its "," or "]"
    for i, body in enumerate(bodies):
        if i > start and size + len(body) + 1 > MAX_FRAME_BYTES:
            _frame(pieces, bodies[start:i], first_seq + start)
            start, size = i, 1
        size += len(body) + 1
    _frame(pieces, bodies[start:], first_seq + start)
    return pieces


def _frame(pieces: list[bytes], bodies: list[bytes], first_seq: int) -> None:
    """Append one frame of ``bodies`` to ``pieces``: header, then the JSON array."""
    tail = _FRAME_TAIL.pack(first_seq, len(bodies))
    joined = b",".join(bodies)
    crc = zlib.crc32(b"]", zlib.crc32(joined, zlib.crc32(b"[", zlib.crc32(tail))))
    head = FRAME_HEADER.pack(FRAME_MAGIC, len(joined) + 2, crc, first_seq, len(bodies))
    pieces += (head, b"[", joined, b"]")


def frame_error(data: bytes, view: memoryview, off: int) -> str | None:
    """Why the bytes at ``off`` are not a complete, checksummed frame (None: they are)."""
    size = len(data)
    if size - off < FRAME_HEADER_BYTES:
        return "truncated frame header"
    magic, length, crc, _first, count = FRAME_HEADER.unpack_from(data, off)
    if magic != FRAME_MAGIC:
        return "bad frame magic"
    if length > MAX_FRAME_BYTES:
        return f"implausible frame length {length}"
    end = off + FRAME_HEADER_BYTES + length
    if end > size:
        return "truncated frame"
    if zlib.crc32(view[off + CRC_START : end]) != crc:
        return "checksum mismatch"
    if count == 0:
        return "frame holds no records"
    return None


# --------------------------------------------------------------------------- snapshots


def snapshot_bytes(seq: int, payload: bytes) -> bytes:
    """A version-2 snapshot file: header, a crc32 per block of the payload (and one
    of that table), payload. Damage is then reported at the block that holds it."""
    block = SNAPSHOT_BLOCK_BYTES
    head = _SNAPSHOT_HEADER_V2.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, seq, len(payload), block, 0)
    head = head[:28] + zlib.crc32(head[:28]).to_bytes(4, "little")
    view = memoryview(payload)
    table = b"".join(
        zlib.crc32(view[at : at + block]).to_bytes(4, "little")
        for at in range(0, len(payload), block)
    )
    return head + table + zlib.crc32(table).to_bytes(4, "little") + payload


def parse_snapshot(name: str, data: bytes, seq: int) -> tuple[dict[str, Any] | None, Damage | None]:
    """The state a snapshot file named ``name`` (for ``seq``) holds, or where and why
    it is unusable: (payload, None) or (None, damage)."""
    if len(data) < SNAPSHOT_HEADER_BYTES:
        return None, Damage(file=name, offset=0, detail="truncated snapshot header")
    magic, version, head_seq, length, crc = _SNAPSHOT_HEADER.unpack_from(data)
    if magic != SNAPSHOT_MAGIC:
        return None, Damage(file=name, offset=0, detail="bad snapshot magic")
    if version == SNAPSHOT_VERSION:
        return _parse_snapshot_v2(name, data, seq)
    if version != 1:
        return None, Damage(file=name, offset=4, detail=f"unsupported snapshot version {version}")
    if head_seq != seq:
        return None, Damage(
            file=name, offset=8, detail=f"snapshot header says seq {head_seq}, name says {seq}"
        )
    if length != len(data) - SNAPSHOT_HEADER_BYTES:
        return None, Damage(
            file=name,
            offset=16,
            detail=f"snapshot length {length} but {len(data) - SNAPSHOT_HEADER_BYTES} "
            "payload bytes present",
        )
    body = memoryview(data)[SNAPSHOT_HEADER_BYTES:]
    if zlib.crc32(body, zlib.crc32(memoryview(data)[:24])) != crc:
        return None, Damage(file=name, offset=0, detail="snapshot checksum mismatch")
    return _decode_snapshot(name, body, SNAPSHOT_HEADER_BYTES)


def _parse_snapshot_v2(
    name: str, data: bytes, seq: int
) -> tuple[dict[str, Any] | None, Damage | None]:
    head = _SNAPSHOT_HEADER_V2
    if len(data) < head.size:
        return None, Damage(file=name, offset=0, detail="truncated snapshot header")
    _magic, _version, head_seq, length, block, crc = head.unpack_from(data)
    view = memoryview(data)
    if zlib.crc32(view[:28]) != crc:
        return None, Damage(file=name, offset=0, detail="snapshot header checksum mismatch")
    if head_seq != seq:
        return None, Damage(
            file=name, offset=8, detail=f"snapshot header says seq {head_seq}, name says {seq}"
        )
    blocks = -(-length // block) if block else -1
    start = head.size + 4 * blocks + 4
    if blocks < 0 or start + length != len(data):
        return None, Damage(
            file=name,
            offset=16,
            detail=f"snapshot length {length} does not match the file's {len(data)} bytes",
        )
    table = view[head.size : start - 4]
    if zlib.crc32(table) != int.from_bytes(view[start - 4 : start], "little"):
        return None, Damage(
            file=name, offset=head.size, detail="snapshot block checksum table mismatch"
        )
    for index in range(blocks):
        at = start + index * block
        expected = int.from_bytes(table[4 * index : 4 * index + 4], "little")
        if zlib.crc32(view[at : min(at + block, len(data))]) != expected:
            return None, Damage(
                file=name,
                offset=at,
                detail=f"snapshot checksum mismatch in the {block}-byte block at offset {at}",
            )
    return _decode_snapshot(name, view[start:], start)


def _decode_snapshot(
    name: str, body: memoryview, offset: int
) -> tuple[dict[str, Any] | None, Damage | None]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, Damage(file=name, offset=offset, detail="undecodable snapshot payload")
    if not isinstance(payload, dict):
        return None, Damage(file=name, offset=offset, detail="snapshot payload is not an object")
    return payload, None
