"""Wire protocol version 1 of the risk gateway: types, codec and codes.

Shared by the gateway and every client. No I/O.
"""

from protocol.codec import decode, encode_error, encode_ok, encode_push, encode_request
from protocol.codes import PROTOCOL_VERSION, Channel, CloseCode, ErrorCode, Mode, Reason, Role
from protocol.errors import ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "Channel",
    "CloseCode",
    "ErrorCode",
    "Mode",
    "ProtocolError",
    "Reason",
    "Role",
    "decode",
    "encode_error",
    "encode_ok",
    "encode_push",
    "encode_request",
]
