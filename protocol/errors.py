"""The one exception of the protocol layer.

``ProtocolError`` means the *client* sent something the contract does not
allow. Its ``code`` is the error code of the response and its ``message`` names
the field and what was wrong, so the caller can fix the request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protocol.codes import ErrorCode


class ProtocolError(Exception):
    """A request the gateway refuses; answered with ``code`` and ``message``."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        request_id: int | str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id: int | str | None = request_id
        #: Extra keys of the error object (``WRONG_GATEWAY``'s ``owner``).
        self.details = details

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.value}, {self.message!r})"


def bad_request(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)
