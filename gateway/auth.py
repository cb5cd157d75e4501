"""Bearer tokens and what their holders may do.

A ``TokenStore`` maps a presented token to a ``Principal`` (name, role,
accounts). Only SHA-256 digests of tokens are ever stored, in memory or on
disk, and no token ever appears in a log line or an exception.

Roles (docs/protocol.md section 4): a ``trader`` reads and trades only the
accounts its token lists (``"*"`` for every account), a ``viewer`` reads every
account and changes nothing, a ``feed`` publishes reference prices and is
otherwise a viewer, an ``admin`` does everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from gateway.config import ConfigError, TokenConfig, load_token_file
from protocol.codes import Role

__all__ = [
    "ALL_ACCOUNTS",
    "TOKENS_FILE",
    "Principal",
    "TokenStore",
    "ensure_default_tokens",
    "hash_token",
]

#: In a trader's accounts: every account.
ALL_ACCOUNTS: Final = "*"
#: The file in the state directory that holds the generated tokens' digests.
TOKENS_FILE: Final = "tokens.toml"


def hash_token(token: str) -> str:
    """The lowercase hex SHA-256 of ``token`` (UTF-8): the ``token_sha256`` of
    the configuration."""
    return _digest(token).hex()


def _digest(token: str) -> bytes:
    # surrogatepass: any str a client can send hashes instead of raising.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """Who is on the other end of an authenticated connection.

    ``name`` is the token's name, used as the ``actor`` of the changes it
    makes. ``accounts`` matters for traders only (``"*"`` = every account).
    """

    name: str
    role: Role
    accounts: frozenset[str] = frozenset()

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    @property
    def can_write(self) -> bool:
        """May call some state-changing method (trader, feed or admin)."""
        return self.role is not Role.VIEWER

    @property
    def publishes_prices(self) -> bool:
        """May set reference prices with ``price.update`` (feed or admin)."""
        return self.role is Role.FEED or self.role is Role.ADMIN

    @property
    def readable(self) -> Callable[[str], bool] | None:
        """``may_read_account`` where it filters anything, else None (the
        principal reads every account): the argument views filter with."""
        return None if self.reads_every_account else self.may_read_account

    @property
    def reads_every_account(self) -> bool:
        """True when ``may_read_account`` holds for any account, so a caller
        can skip filtering (viewers, admins and traders with ``"*"``)."""
        return self.role is not Role.TRADER or ALL_ACCOUNTS in self.accounts

    def may_read_account(self, account: str) -> bool:
        """Viewers and admins read every account; a trader only its own."""
        if self.role is not Role.TRADER:
            return True
        return ALL_ACCOUNTS in self.accounts or account in self.accounts

    def may_trade_account(self, account: str) -> bool:
        """Admins act on every account, a trader on its own, a viewer on none."""
        if self.role is Role.ADMIN:
            return True
        if self.role is Role.TRADER:
            return ALL_ACCOUNTS in self.accounts or account in self.accounts
        return False

    def to_wire(self) -> dict[str, Any]:
        """The ``session.auth`` result: ``{role, accounts, name}``."""
        return {"role": self.role.value, "accounts": sorted(self.accounts), "name": self.name}

    @classmethod
    def from_token(cls, token: TokenConfig) -> Principal:
        return cls(name=token.name, role=token.role, accounts=frozenset(token.accounts))


class TokenStore:
    """The tokens the gateway accepts, as digests only.

    ``authenticate`` takes time independent of which stored token (if any)
    matches. Raises ``ValueError`` at construction if two entries share a
    token (named by their names, never by the token).
    """

    __slots__ = ("_entries",)

    def __init__(self, tokens: Sequence[TokenConfig]) -> None:
        entries: list[tuple[bytes, Principal]] = []
        seen: dict[bytes, str] = {}
        for token in tokens:
            digest = bytes.fromhex(token.token_sha256)
            if digest in seen:
                raise ValueError(f"tokens {seen[digest]!r} and {token.name!r} share one token")
            seen[digest] = token.name
            entries.append((digest, Principal.from_token(token)))
        self._entries: tuple[tuple[bytes, Principal], ...] = tuple(entries)

    def authenticate(self, token: str) -> Principal | None:
        """The principal ``token`` belongs to, or None for an unknown token."""
        if not isinstance(token, str) or not token:
            return None
        presented = _digest(token)
        found: Principal | None = None
        # Every digest is compared, with no early exit, so the time taken does
        # not tell an attacker which entry matched or how far the scan went.
        for stored, principal in self._entries:
            if hmac.compare_digest(presented, stored):
                found = principal
        return found

    def digests(self) -> dict[str, bytes]:
        """Name -> digest: what changed between two stores (revoked, rotated)."""
        return {principal.name: digest for digest, principal in self._entries}

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        names = ", ".join(principal.name for _, principal in self._entries)
        return f"TokenStore([{names}])"


_DEFAULT_ROLES: Final = (
    ("admin", Role.ADMIN, ()),
    ("viewer", Role.VIEWER, ()),
    ("feed", Role.FEED, ()),
    ("trader", Role.TRADER, (ALL_ACCOUNTS,)),
)


def ensure_default_tokens(
    state_dir: Path,
) -> tuple[tuple[TokenConfig, ...], dict[str, str] | None]:
    """The tokens of a gateway started without configured tokens.

    If ``STATE_DIR/tokens.toml`` exists, its tokens are returned with ``None``.
    Otherwise one token per role is generated (names ``admin``, ``viewer`` and
    ``trader``, the trader on every account), their digests alone are written
    to that file (mode 0600, atomically, fsynced), and the plain tokens are
    returned as ``{name: token}``: the caller shows them once, since they
    cannot be recovered afterwards.

    Raises ``ConfigError`` when the file is invalid or cannot be written.
    """
    path = state_dir / TOKENS_FILE
    if path.exists():
        return load_token_file(path), None
    plain = {name: secrets.token_urlsafe(32) for name, _, _ in _DEFAULT_ROLES}
    tokens = tuple(
        TokenConfig(name=name, role=role, accounts=accounts, token_sha256=hash_token(plain[name]))
        for name, role, accounts in _DEFAULT_ROLES
    )
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        created = _create_file_atomically(path, render_tokens(tokens).encode("utf-8"))
    except OSError as error:
        raise ConfigError(
            f"{path}: cannot write the tokens file: {error.strerror or error}"
        ) from None
    if not created:
        # Another process created it first; its tokens are the ones in force.
        return load_token_file(path), None
    return tokens, plain


def render_tokens(tokens: Sequence[TokenConfig]) -> str:
    lines = [
        "# Tokens of this gateway: SHA-256 digests only; each token was printed once.",
        "# Change them with `risk-gateway tokens list|add|rotate|revoke` and SIGHUP.",
    ]
    for token in tokens:
        lines += ["", "[[tokens]]", f'name = "{token.name}"', f'role = "{token.role.value}"']
        if token.accounts:
            accounts = ", ".join(f'"{account}"' for account in token.accounts)
            lines.append(f"accounts = [{accounts}]")
        lines.append(f'token_sha256 = "{token.token_sha256}"')
    return "\n".join(lines) + "\n"


def _create_file_atomically(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` only if it does not exist yet; False if it did.

    Readers see either no file or the whole fsynced file, never a part of it.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        try:
            # A hard link never replaces an existing file, so two gateways
            # starting at once cannot each print tokens for the other to
            # overwrite.
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            # Filesystems without hard links: an atomic rename still keeps
            # readers from seeing a partial file.
            os.replace(tmp, path)
        _fsync_directory(path.parent)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
