"""``risk-gateway tokens``: the state directory's tokens file, edited safely.

The file (``STATE_DIR/tokens.toml``) holds SHA-256 digests only. ``add`` and
``rotate`` make a new random token and return it so the caller prints it
once; nothing keeps it. Every change rewrites the file atomically (a
temporary file, fsynced, renamed over the old one, the directory fsynced),
so a crash leaves the old file or the new one, never a part. A running
gateway takes the file again at ``SIGHUP`` and closes the connections of a
revoked or rotated token with 4001.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
from collections.abc import Sequence
from pathlib import Path

from gateway.auth import TOKENS_FILE, hash_token, render_tokens
from gateway.config import ConfigError, TokenConfig, load_token_file
from protocol.codes import Role

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ACCOUNT_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class TokenFileError(Exception):
    """A change refused; the message says why, in one line."""


def path_of(state_dir: Path) -> Path:
    return state_dir / TOKENS_FILE


def load(state_dir: Path) -> tuple[TokenConfig, ...]:
    path = path_of(state_dir)
    if not path.exists():
        raise TokenFileError(
            f"{path}: no tokens file (a gateway started once on this state directory makes one)"
        )
    try:
        return load_token_file(path)
    except ConfigError as error:
        raise TokenFileError(str(error)) from None


def save(state_dir: Path, tokens: Sequence[TokenConfig]) -> None:
    """Replace the tokens file atomically (readers see the old or the new one)."""
    path = path_of(state_dir)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=state_dir)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(render_tokens(tokens).encode("utf-8"))
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
        directory = os.open(state_dir, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


def _find(tokens: Sequence[TokenConfig], name: str) -> int:
    for index, token in enumerate(tokens):
        if token.name == name:
            return index
    known = ", ".join(t.name for t in tokens) or "none"
    raise TokenFileError(f"no token named {name!r} (tokens: {known})")


def add(state_dir: Path, name: str, role: str, accounts: Sequence[str]) -> str:
    """A new token for ``name``; returns it (shown once)."""
    if not _NAME_RE.fullmatch(name):
        raise TokenFileError(f"name {name!r}: 1 to 64 characters of A-Z a-z 0-9 . _ -")
    try:
        parsed_role = Role(role)
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise TokenFileError(f"role {role!r}: one of {roles}") from None
    for account in accounts:
        if account != "*" and not _ACCOUNT_RE.fullmatch(account):
            raise TokenFileError(f"account {account!r}: not an account name")
    if parsed_role is Role.TRADER and not accounts:
        raise TokenFileError('a trader needs --accounts (names, or "*" for every account)')
    if parsed_role is not Role.TRADER and accounts:
        raise TokenFileError(f"--accounts is for traders; a {role} reaches every account")
    tokens = list(load(state_dir))
    if any(t.name == name for t in tokens):
        raise TokenFileError(f"a token named {name!r} exists (rotate or revoke it)")
    plain = secrets.token_urlsafe(32)
    tokens.append(
        TokenConfig(
            name=name, role=parsed_role, accounts=tuple(accounts), token_sha256=hash_token(plain)
        )
    )
    save(state_dir, tokens)
    return plain


def rotate(state_dir: Path, name: str) -> str:
    """A new token for ``name`` (the old one stops working); returns it."""
    tokens = list(load(state_dir))
    index = _find(tokens, name)
    plain = secrets.token_urlsafe(32)
    old = tokens[index]
    tokens[index] = TokenConfig(
        name=old.name, role=old.role, accounts=old.accounts, token_sha256=hash_token(plain)
    )
    save(state_dir, tokens)
    return plain


def revoke(state_dir: Path, name: str) -> None:
    tokens = list(load(state_dir))
    index = _find(tokens, name)
    if len(tokens) == 1:
        raise TokenFileError(f"{name!r} is the last token: nobody could log in (add one first)")
    del tokens[index]
    save(state_dir, tokens)
