"""Tokens, roles and the generated tokens file."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from gateway.auth import (
    TOKENS_FILE,
    Principal,
    TokenStore,
    ensure_default_tokens,
    hash_token,
)
from gateway.config import ConfigError, TokenConfig, load_config
from protocol.codes import Role


def token(name: str, role: Role, secret: str, accounts: tuple[str, ...] = ()) -> TokenConfig:
    return TokenConfig(name=name, role=role, accounts=accounts, token_sha256=hash_token(secret))


def trader(*accounts: str) -> Principal:
    return Principal(name="desk", role=Role.TRADER, accounts=frozenset(accounts))


# --- hashing and authentication -------------------------------------------------


def test_hash_token_when_called_then_gives_lowercase_hex_sha256_of_utf8() -> None:
    assert hash_token("abc") == ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    assert hash_token("päss") == hashlib.sha256("päss".encode()).hexdigest()


def test_authenticate_when_token_is_right_then_returns_its_principal() -> None:
    store = TokenStore(
        [
            token("ops", Role.ADMIN, "admin-secret"),
            token("desk-1", Role.TRADER, "trader-secret", ("A1", "A2")),
        ]
    )

    principal = store.authenticate("trader-secret")

    assert principal == Principal(name="desk-1", role=Role.TRADER, accounts=frozenset({"A1", "A2"}))
    assert store.authenticate("admin-secret") == Principal(name="ops", role=Role.ADMIN)


@pytest.mark.parametrize("presented", ["wrong", "trader-secre", "trader-secret ", "", "\udcff"])
def test_authenticate_when_token_is_wrong_then_returns_none(presented: str) -> None:
    store = TokenStore([token("desk-1", Role.TRADER, "trader-secret", ("A1",))])

    assert store.authenticate(presented) is None


def test_authenticate_when_store_is_empty_then_returns_none() -> None:
    store = TokenStore([])

    assert len(store) == 0
    assert store.authenticate("anything") is None


def test_authenticate_when_config_has_plain_and_sha256_tokens_then_both_are_accepted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(
        f"""
        [[tokens]]
        name = "plain"
        role = "viewer"
        token = "plain-text-token"
        [[tokens]]
        name = "hashed"
        role = "admin"
        token_sha256 = "{hash_token("hashed-token").upper()}"
        """,
        encoding="utf-8",
    )
    store = TokenStore(load_config(path).tokens)

    plain = store.authenticate("plain-text-token")
    hashed = store.authenticate("hashed-token")

    assert len(store) == 2
    assert plain is not None and (plain.name, plain.role) == ("plain", Role.VIEWER)
    assert hashed is not None and (hashed.name, hashed.role) == ("hashed", Role.ADMIN)
    assert store.authenticate(hash_token("hashed-token")) is None


def test_token_store_when_two_entries_share_a_token_then_value_error_without_the_token() -> None:
    with pytest.raises(ValueError) as info:
        TokenStore([token("a", Role.ADMIN, "same-secret"), token("b", Role.VIEWER, "same-secret")])

    assert "same-secret" not in str(info.value)
    assert "'a'" in str(info.value) and "'b'" in str(info.value)


def test_token_store_when_printed_then_shows_names_only() -> None:
    store = TokenStore([token("ops", Role.ADMIN, "admin-secret")])

    assert repr(store) == "TokenStore([ops])"


# --- roles and accounts -----------------------------------------------------------


def test_trader_when_account_is_listed_then_may_read_and_trade_it() -> None:
    desk = trader("A1", "A2")

    assert desk.may_read_account("A1") and desk.may_trade_account("A2")
    assert desk.can_write and not desk.is_admin and not desk.reads_every_account


def test_trader_when_account_is_not_listed_then_may_neither_read_nor_trade_it() -> None:
    desk = trader("A1")

    assert not desk.may_read_account("A2")
    assert not desk.may_trade_account("A2")
    assert not desk.may_trade_account("a1")


def test_trader_when_accounts_hold_star_then_may_read_and_trade_every_account() -> None:
    desk = trader("*")

    assert desk.may_read_account("ANY-1") and desk.may_trade_account("ANY-2")
    assert desk.reads_every_account


def test_viewer_when_asked_then_reads_every_account_and_trades_none() -> None:
    viewer = Principal(name="screen", role=Role.VIEWER)

    assert viewer.may_read_account("A1") and viewer.reads_every_account
    assert not viewer.may_trade_account("A1")
    assert not viewer.can_write and not viewer.is_admin


def test_admin_when_asked_then_reads_and_trades_every_account() -> None:
    admin = Principal(name="ops", role=Role.ADMIN)

    assert admin.may_read_account("A1") and admin.may_trade_account("A1")
    assert admin.can_write and admin.is_admin


def test_to_wire_when_called_then_gives_session_auth_result_with_sorted_accounts() -> None:
    assert trader("B2", "A1").to_wire() == {
        "role": "trader",
        "accounts": ["A1", "B2"],
        "name": "desk",
    }
    assert Principal(name="ops", role=Role.ADMIN).to_wire() == {
        "role": "admin",
        "accounts": [],
        "name": "ops",
    }


# --- generated tokens ---------------------------------------------------------------


def test_ensure_default_tokens_when_no_file_then_creates_digest_only_file_and_returns_tokens(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "nested" / "state"

    tokens, plain = ensure_default_tokens(state_dir)

    assert plain is not None
    assert set(plain) == {"admin", "viewer", "feed", "trader"}
    assert len(set(plain.values())) == 4
    path = state_dir / TOKENS_FILE
    content = path.read_bytes()
    for secret in plain.values():
        assert len(secret) >= 40
        assert secret.encode() not in content
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in state_dir.iterdir()] == [TOKENS_FILE]
    store = TokenStore(tokens)
    for name, role in [
        ("admin", Role.ADMIN),
        ("viewer", Role.VIEWER),
        ("feed", Role.FEED),
        ("trader", Role.TRADER),
    ]:
        principal = store.authenticate(plain[name])
        assert principal is not None
        assert (principal.name, principal.role) == (name, role)
    assert store.authenticate(plain["trader"]) == Principal(
        name="trader", role=Role.TRADER, accounts=frozenset({"*"})
    )


def test_ensure_default_tokens_when_called_again_then_same_digests_and_no_plain_tokens(
    tmp_path: Path,
) -> None:
    first, plain = ensure_default_tokens(tmp_path)
    assert plain is not None

    again, plain_again = ensure_default_tokens(tmp_path)

    assert plain_again is None
    assert again == first
    admin = TokenStore(again).authenticate(plain["admin"])
    assert admin is not None and admin.is_admin


def test_ensure_default_tokens_when_file_is_invalid_then_config_error_names_file(
    tmp_path: Path,
) -> None:
    (tmp_path / TOKENS_FILE).write_text('[[tokens]]\nname = "x"\nrole = "boss"\n')

    with pytest.raises(ConfigError) as info:
        ensure_default_tokens(tmp_path)

    assert str(info.value) == (
        f"{tmp_path / TOKENS_FILE}: tokens[0].role: expected one of "
        '"trader", "viewer", "feed", "admin", got "boss"'
    )


def test_ensure_default_tokens_when_file_holds_a_plain_token_then_config_error_hides_it(
    tmp_path: Path,
) -> None:
    (tmp_path / TOKENS_FILE).write_text(
        '[[tokens]]\nname = "x"\nrole = "admin"\ntoken = "leaky-secret"\n'
    )

    with pytest.raises(ConfigError) as info:
        ensure_default_tokens(tmp_path)

    assert str(info.value).endswith("tokens[0].token: not allowed here, only token_sha256")
    assert "leaky-secret" not in str(info.value)


def test_ensure_default_tokens_when_file_holds_no_tokens_then_config_error(
    tmp_path: Path,
) -> None:
    (tmp_path / TOKENS_FILE).write_text("# emptied by hand\n")

    with pytest.raises(ConfigError, match=r"tokens: missing \(the file holds no token\)$"):
        ensure_default_tokens(tmp_path)
