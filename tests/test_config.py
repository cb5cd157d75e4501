"""Configuration: the TOML file of docs/protocol.md section 8 and ``Limits``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType

import pytest

from gateway.config import (
    ConfigError,
    EffectiveLimits,
    GatewayConfig,
    Limits,
    PersistenceConfig,
    ServerConfig,
    SymbolLimits,
    load_config,
    with_overrides,
)
from protocol.codes import Role

# The example of docs/protocol.md section 8, verbatim.
PROTOCOL_EXAMPLE = """\
[server]
host = "127.0.0.1"
port = 8765
max_message_bytes = 65536
max_messages_per_second = 50000  # per connection
max_queued_bytes = 1048576       # per connection, then close 4003
max_connections = 10000          # beyond: HTTP 503 at the handshake
max_connections_per_ip = 1000    # likewise
auth_timeout_s = 5
heartbeat_s = 1
allowed_origins = []             # the gateway's own origin is always allowed

[persistence]
state_dir = "gateway-state"
fsync = "always"                 # always | interval | never
fsync_interval_ms = 100          # for "interval"
snapshot_every = 100000          # journal records between snapshots

[limits]
max_exposure = "1000000"
max_account_exposure = "1000000"
max_position = "1000000"
max_order_qty = "1000000"
max_order_notional = "1000000"
price_collar = "0.10"
max_orders_per_second = 1000
restricted_symbols = []
reservation_ttl_ms = 5000
auto_reduce_on_breach = true

[limits.symbols."BTC-USD"]
max_position = "10"

[[tokens]]
name = "desk-1"
role = "trader"                  # trader | viewer | admin
accounts = ["A1", "A2"]
token = "plain-text-token"       # or token_sha256 = "hex digest"
"""

DIGEST = "ab" * 32


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message.removeprefix(f"{path}: ")


# --- defaults and the protocol example ----------------------------------------


def test_load_when_no_path_then_defaults_match_protocol_section_8() -> None:
    cfg = load_config(None)

    assert cfg.server == ServerConfig(
        host="127.0.0.1",
        port=8765,
        max_message_bytes=65536,
        max_messages_per_second=50000,
        max_queued_bytes=1048576,
        max_connections=10000,
        max_connections_per_ip=1000,
        auth_timeout_s=5.0,
        heartbeat_s=1.0,
        allowed_origins=(),
    )
    assert cfg.persistence.state_dir == Path("gateway-state")
    assert cfg.persistence.fsync == "always"
    assert cfg.persistence.fsync_interval_ms == 100
    assert cfg.persistence.snapshot_every == 100000
    limits = cfg.limits
    assert limits.max_exposure == Decimal("1000000")
    assert limits.max_account_exposure == Decimal("1000000")
    assert limits.max_position == Decimal("1000000")
    assert limits.max_order_qty == Decimal("1000000")
    assert limits.max_order_notional == Decimal("1000000")
    assert limits.price_collar == Decimal("0.10")
    assert limits.max_orders_per_second == 1000
    assert limits.restricted_symbols == frozenset()
    assert limits.reservation_ttl_ms == 5000
    assert limits.auto_reduce_on_breach is True
    assert dict(limits.symbols) == {}
    assert cfg.tokens == ()
    assert cfg.rules == ()
    assert cfg.source is None


def test_load_when_file_is_empty_then_every_value_is_the_default(tmp_path: Path) -> None:
    path = write(tmp_path, "")

    cfg = load_config(path)

    assert dataclasses.replace(cfg, source=None) == load_config(None)
    assert cfg.source == path


def test_load_when_protocol_example_then_every_value_is_read(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, PROTOCOL_EXAMPLE))

    assert cfg.server == ServerConfig()
    assert cfg.persistence == PersistenceConfig()
    assert cfg.limits.symbols == {"BTC-USD": SymbolLimits(max_position=Decimal("10"))}
    assert dataclasses.replace(cfg.limits, symbols={}) == Limits()
    (token,) = cfg.tokens
    assert token.name == "desk-1"
    assert token.role is Role.TRADER
    assert token.accounts == ("A1", "A2")
    assert token.token_sha256 == hashlib.sha256(b"plain-text-token").hexdigest()


def test_load_when_every_value_differs_from_default_then_each_is_read(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
            rules = ["desk_rules.fat_finger:check", "pkg.mod:Rule.check"]
            [server]
            host = "0.0.0.0"
            port = 0
            max_message_bytes = 1024
            max_messages_per_second = 10
            max_queued_bytes = 4096
            max_connections = 5
            max_connections_per_ip = 2
            auth_timeout_s = 0.5
            heartbeat_s = 2
            allowed_origins = ["https://desk.example.com", "http://localhost:3000"]
            [persistence]
            state_dir = "/var/lib/gw"
            fsync = "interval"
            fsync_interval_ms = 20
            snapshot_every = 50
            [limits]
            max_exposure = "5000.5"
            max_account_exposure = 800
            max_position = 0.1
            max_order_qty = "7"
            max_order_notional = "9000"
            price_collar = 0
            max_orders_per_second = 3
            restricted_symbols = ["DOGE-USD", "ETH-USD"]
            reservation_ttl_ms = 250
            auto_reduce_on_breach = false
            """,
        )
    )

    assert cfg.rules == ("desk_rules.fat_finger:check", "pkg.mod:Rule.check")
    assert cfg.server == ServerConfig(
        host="0.0.0.0",
        port=0,
        max_message_bytes=1024,
        max_messages_per_second=10,
        max_queued_bytes=4096,
        max_connections=5,
        max_connections_per_ip=2,
        auth_timeout_s=0.5,
        heartbeat_s=2.0,
        allowed_origins=("https://desk.example.com", "http://localhost:3000"),
    )
    assert cfg.persistence == PersistenceConfig(
        state_dir=Path("/var/lib/gw"), fsync="interval", fsync_interval_ms=20, snapshot_every=50
    )
    assert cfg.limits == Limits(
        max_exposure=Decimal("5000.5"),
        max_account_exposure=Decimal("800"),
        max_position=Decimal("0.1"),
        max_order_qty=Decimal("7"),
        max_order_notional=Decimal("9000"),
        price_collar=Decimal("0"),
        max_orders_per_second=3,
        restricted_symbols=frozenset({"DOGE-USD", "ETH-USD"}),
        reservation_ttl_ms=250,
        auto_reduce_on_breach=False,
    )


def test_load_when_state_dir_is_relative_then_it_is_kept_as_given(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[persistence]\nstate_dir = "data/gw"\n'))

    assert cfg.persistence.state_dir == Path("data/gw")


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("servre = {}\n", "servre"),
        ("[server]\nprot = 1\n", "server.prot"),
        ("[persistence]\nfsink = 'always'\n", "persistence.fsink"),
        ("[limits]\nmax_exposre = '1'\n", "limits.max_exposre"),
        ('[limits.symbols."BTC-USD"]\nmax_exposure = "1"\n', "limits.symbols.BTC-USD.max_exposure"),
        ('[limits.symbols."BTC/USD"]\nmax_qty = "1"\n', 'limits.symbols."BTC/USD".max_qty'),
        (
            '[[tokens]]\nname = "a"\nrole = "admin"\ntoken = "t"\nrol = "x"\n',
            "tokens[0].rol",
        ),
    ],
)
def test_load_when_unknown_key_then_error_names_file_and_dotted_key(
    tmp_path: Path, text: str, key: str
) -> None:
    assert load_error(tmp_path, text) == f"{key}: unknown key"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server]\nport = "80"\n', 'server.port: expected an integer from 0 to 65535, got "80"'),
        ("[server]\nport = 70000\n", "server.port: expected an integer from 0 to 65535, got 70000"),
        ("[server]\nport = true\n", "server.port: expected an integer from 0 to 65535, got true"),
        ("[server]\nport = 80.0\n", "server.port: expected an integer from 0 to 65535, got 80.0"),
        (
            "[server]\nmax_connections = 0\n",
            "server.max_connections: expected a positive integer, got 0",
        ),
        (
            '[server]\nheartbeat_s = "1"\n',
            'server.heartbeat_s: expected a positive number of seconds, got "1"',
        ),
        (
            "[server]\nauth_timeout_s = -1\n",
            "server.auth_timeout_s: expected a positive number of seconds, got -1",
        ),
        (
            "[server]\nhost = 1\n",
            'server.host: expected a host name or address like "127.0.0.1", got 1',
        ),
        ('[server]\nallowed_origins = "x"\n', 'server.allowed_origins: expected an array, got "x"'),
        (
            '[server]\nallowed_origins = ["https://a.example/"]\n',
            'server.allowed_origins[0]: expected an origin like "https://desk.example.com"'
            ' (scheme://host[:port], no path), got "https://a.example/"',
        ),
        ("server = 1\n", "server: expected a table, got 1"),
        (
            "[persistence]\nsnapshot_every = 0\n",
            "persistence.snapshot_every: expected a positive integer, got 0",
        ),
        (
            "[persistence]\nstate_dir = 1979-05-27\n",
            "persistence.state_dir: expected a non-empty path string, got a date",
        ),
        (
            "[limits]\nauto_reduce_on_breach = 1\n",
            "limits.auto_reduce_on_breach: expected true or false, got 1",
        ),
        (
            '[limits]\nmax_orders_per_second = "5"\n',
            'limits.max_orders_per_second: expected an integer from 1 to 1000000000, got "5"',
        ),
        (
            '[limits]\nrestricted_symbols = ["OK", "NOT OK"]\n',
            "limits.restricted_symbols[1]: expected a symbol of 1 to 64 characters of"
            ' A-Z a-z 0-9 . _ : / -, got "NOT OK"',
        ),
        (
            '[limits.symbols."BTC USD"]\nmax_position = "1"\n',
            'limits.symbols."BTC USD": expected a symbol of 1 to 64 characters of'
            ' A-Z a-z 0-9 . _ : / -, got "BTC USD"',
        ),
        ('rules = ["no_colon"]\n', 'rules[0]: expected "package.module:callable", got "no_colon"'),
    ],
)
def test_load_when_value_has_wrong_type_or_range_then_error_says_what_was_expected(
    tmp_path: Path, text: str, message: str
) -> None:
    assert load_error(tmp_path, text) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[limits]\nmax_exposure = "abc"\n',
            'limits.max_exposure: expected a decimal string like "1000", got "abc"',
        ),
        (
            '[limits]\nmax_exposure = "1e6"\n',
            'limits.max_exposure: expected a decimal string like "1000", got "1e6"',
        ),
        (
            "[limits]\nmax_exposure = true\n",
            'limits.max_exposure: expected a decimal string like "1000", got true',
        ),
        (
            '[limits]\nmax_position = "-5"\n',
            'limits.max_position: expected a value greater than 0, got "-5"',
        ),
        (
            "[limits]\nmax_order_qty = 0\n",
            "limits.max_order_qty: expected a value greater than 0, got 0",
        ),
        (
            '[limits]\nprice_collar = "-0.1"\n',
            'limits.price_collar: expected a value of at least 0, got "-0.1"',
        ),
        (
            '[limits]\nprice_collar = "ten percent"\n',
            'limits.price_collar: expected a decimal string like "0.10", got "ten percent"',
        ),
        (
            '[limits.symbols.ETH]\nmax_order_notional = "0"\n',
            'limits.symbols.ETH.max_order_notional: expected a value greater than 0, got "0"',
        ),
    ],
)
def test_load_when_limit_is_not_a_valid_decimal_then_error_names_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    assert load_error(tmp_path, text) == message


def test_load_when_fsync_is_not_a_known_policy_then_error_lists_the_policies(
    tmp_path: Path,
) -> None:
    message = load_error(tmp_path, '[persistence]\nfsync = "sometimes"\n')

    assert message == (
        'persistence.fsync: expected one of "always", "interval", "never", got "sometimes"'
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            'name = "a"\nrole = "root"\ntoken = "t"',
            'tokens[0].role: expected one of "trader", "viewer", "feed", "admin", got "root"',
        ),
        (
            'name = "a"\ntoken = "t"',
            'tokens[0].role: missing (one of "trader", "viewer", "feed", "admin")',
        ),
        ('name = "a"\nrole = "admin"', "tokens[0]: missing token or token_sha256"),
        (
            f'name = "a"\nrole = "admin"\ntoken = "t"\ntoken_sha256 = "{DIGEST}"',
            "tokens[0]: expected exactly one of token or token_sha256, got both",
        ),
        (
            'name = "a"\nrole = "trader"\ntoken = "t"',
            'tokens[0].accounts: missing (a trader needs its accounts, or ["*"] for all)',
        ),
        (
            'name = "a"\nrole = "trader"\naccounts = []\ntoken = "t"',
            'tokens[0].accounts: expected a non-empty array of accounts (or ["*"] for all),'
            " got an empty array",
        ),
        (
            'name = "a"\nrole = "trader"\naccounts = ["A 1"]\ntoken = "t"',
            'tokens[0].accounts[0]: expected an account or "*" of 1 to 64 characters of'
            ' A-Z a-z 0-9 . _ : / -, got "A 1"',
        ),
        ('role = "admin"\ntoken = "t"', "tokens[0].name: missing (every token needs a name)"),
        (
            'name = "a"\nrole = "admin"\ntoken_sha256 = "xyz"',
            "tokens[0].token_sha256: expected 64 hexadecimal digits, got a string of 3 characters",
        ),
        (
            'name = "a"\nrole = "admin"\ntoken = ""',
            "tokens[0].token: expected a non-empty string, got an empty string",
        ),
    ],
)
def test_load_when_token_entry_is_invalid_then_error_names_the_entry_key(
    tmp_path: Path, entry: str, message: str
) -> None:
    assert load_error(tmp_path, f"[[tokens]]\n{entry}\n") == message


def test_load_when_tokens_is_a_table_then_error_asks_for_an_array_of_tables(
    tmp_path: Path,
) -> None:
    message = load_error(tmp_path, '[tokens]\nname = "a"\n')

    assert message == "tokens: expected an array of tables ([[tokens]]), got a table"


def test_load_when_two_tokens_share_a_name_then_error_names_both_entries(tmp_path: Path) -> None:
    text = (
        '[[tokens]]\nname = "a"\nrole = "admin"\ntoken = "t1"\n'
        '[[tokens]]\nname = "a"\nrole = "viewer"\ntoken = "t2"\n'
    )

    message = load_error(tmp_path, text)

    assert message == 'tokens[1].name: expected a unique name, got "a" (also tokens[0])'


def test_load_when_two_entries_share_a_token_then_error_does_not_show_the_token(
    tmp_path: Path,
) -> None:
    secret = "s3cret-token-value"
    digest = hashlib.sha256(secret.encode()).hexdigest()
    text = (
        f'[[tokens]]\nname = "a"\nrole = "admin"\ntoken = "{secret}"\n'
        f'[[tokens]]\nname = "b"\nrole = "viewer"\ntoken_sha256 = "{digest.upper()}"\n'
    )

    message = load_error(tmp_path, text)

    assert message == (
        "tokens[1].token_sha256: expected a token no other entry uses,"
        " got the same token as tokens[0]"
    )
    assert secret not in message
    assert digest not in message.lower()


def test_load_when_plain_token_is_pasted_as_digest_then_error_does_not_show_it(
    tmp_path: Path,
) -> None:
    secret = "my-plain-secret-token"

    message = load_error(
        tmp_path, f'[[tokens]]\nname = "a"\nrole = "admin"\ntoken_sha256 = "{secret}"\n'
    )

    assert secret not in message


def test_load_when_toml_is_invalid_then_error_names_the_file_and_position(tmp_path: Path) -> None:
    message = load_error(tmp_path, "[server]\nport = \n")

    assert message.startswith("invalid TOML: ")
    assert "line 2" in message


def test_load_when_file_is_missing_then_config_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError, match=r"absent\.toml: cannot read the file"):
        load_config(path)


def test_load_when_string_value_holds_a_newline_then_error_stays_on_one_line(
    tmp_path: Path,
) -> None:
    message = load_error(tmp_path, '[server]\nport = "8\\n0"\n')

    assert message == 'server.port: expected an integer from 0 to 65535, got "8\\n0"'


# --- tokens -------------------------------------------------------------------


def test_load_when_tokens_use_both_forms_then_only_lowercase_digests_are_kept(
    tmp_path: Path,
) -> None:
    cfg = load_config(
        write(
            tmp_path,
            f"""
            [[tokens]]
            name = "ops"
            role = "admin"
            token_sha256 = "{DIGEST.upper()}"
            [[tokens]]
            name = "screen"
            role = "viewer"
            accounts = ["A1"]
            token = "viewer-token"
            [[tokens]]
            name = "algo"
            role = "trader"
            accounts = ["*"]
            token = "trader-token"
            """,
        )
    )

    ops, screen, algo = cfg.tokens
    assert (ops.role, ops.token_sha256, ops.accounts) == (Role.ADMIN, DIGEST, ())
    assert screen.role is Role.VIEWER
    assert screen.accounts == ()
    assert screen.token_sha256 == hashlib.sha256(b"viewer-token").hexdigest()
    assert algo.accounts == ("*",)
    assert "trader-token" not in repr(cfg)
    assert algo.token_sha256 not in repr(cfg)


# --- Limits -------------------------------------------------------------------


def test_for_symbol_when_symbol_has_override_then_override_replaces_global_value() -> None:
    limits = Limits.from_mapping(
        {
            "max_position": "100",
            "price_collar": "0.05",
            "symbols": {"BTC-USD": {"max_position": "10", "price_collar": "0"}},
        }
    )

    assert limits.for_symbol("BTC-USD") == EffectiveLimits(
        max_position=Decimal("10"),
        max_order_qty=Decimal("1000000"),
        max_order_notional=Decimal("1000000"),
        price_collar=Decimal("0"),
    )


def test_for_symbol_when_symbol_has_no_override_then_global_values_apply() -> None:
    limits = Limits.from_mapping(
        {"max_position": "100", "symbols": {"BTC-USD": {"max_position": "10"}}}
    )

    assert limits.for_symbol("ETH-USD") == EffectiveLimits(
        max_position=Decimal("100"),
        max_order_qty=Decimal("1000000"),
        max_order_notional=Decimal("1000000"),
        price_collar=Decimal("0.10"),
    )


def test_for_symbol_when_limits_are_replaced_then_overrides_are_recomputed() -> None:
    limits = Limits(symbols={"BTC-USD": SymbolLimits(max_order_qty=Decimal("2"))})

    changed = dataclasses.replace(limits, max_position=Decimal("7"))

    assert changed.for_symbol("BTC-USD").max_position == Decimal("7")
    assert changed.for_symbol("BTC-USD").max_order_qty == Decimal("2")


def test_from_mapping_when_base_given_then_unspecified_values_are_kept() -> None:
    base = Limits.from_mapping(
        {
            "max_exposure": "500",
            "restricted_symbols": ["DOGE"],
            "auto_reduce_on_breach": False,
            "symbols": {"BTC-USD": {"max_position": "10"}},
        }
    )

    updated = Limits.from_mapping({"max_account_exposure": "50"}, base=base)

    assert updated == dataclasses.replace(base, max_account_exposure=Decimal("50"))


def test_from_mapping_when_symbols_given_then_only_named_symbols_change() -> None:
    base = Limits.from_mapping(
        {
            "symbols": {
                "BTC-USD": {"max_position": "10", "max_order_qty": "1"},
                "ETH-USD": {"max_position": "20"},
                "SOL-USD": {"price_collar": "0.2"},
            }
        }
    )

    updated = Limits.from_mapping(
        {"symbols": {"BTC-USD": {"max_order_notional": "99"}, "ETH-USD": {}}}, base=base
    )

    assert dict(updated.symbols) == {
        "BTC-USD": SymbolLimits(max_order_notional=Decimal("99")),
        "SOL-USD": SymbolLimits(price_collar=Decimal("0.2")),
    }
    assert updated.for_symbol("ETH-USD") == updated.for_symbol("UNLISTED")


def test_from_mapping_when_decimals_are_json_numbers_then_they_are_read_exactly() -> None:
    limits = Limits.from_mapping({"price_collar": 0.1, "max_exposure": 250000, "max_position": 2.5})

    assert limits.price_collar == Decimal("0.1")
    assert limits.max_exposure == Decimal("250000")
    assert limits.max_position == Decimal("2.5")


def test_from_mapping_when_invalid_then_error_uses_where_without_file_name() -> None:
    with pytest.raises(ConfigError) as info:
        Limits.from_mapping({"max_exposure": "-1"}, where="params.limits")

    assert (
        str(info.value) == 'params.limits.max_exposure: expected a value greater than 0, got "-1"'
    )


def test_from_mapping_when_not_a_mapping_then_error_names_where() -> None:
    with pytest.raises(ConfigError) as info:
        Limits.from_mapping([], where="params.limits")  # type: ignore[arg-type]

    assert str(info.value) == "params.limits: expected a table, got an empty array"


def test_to_wire_when_read_back_with_from_mapping_then_limits_are_equal() -> None:
    limits = Limits.from_mapping(
        {
            "max_exposure": "1234.5600",
            "price_collar": "0",
            "restricted_symbols": ["ZZZ", "AAA"],
            "reservation_ttl_ms": 10,
            "auto_reduce_on_breach": False,
            "symbols": {"BTC-USD": {"max_position": "10", "price_collar": "0.01"}},
        }
    )

    wire = limits.to_wire()

    assert Limits.from_mapping(json.loads(json.dumps(wire))) == limits
    assert wire["max_exposure"] == "1234.56"
    assert wire["price_collar"] == "0"
    assert wire["restricted_symbols"] == ["AAA", "ZZZ"]
    assert wire["symbols"] == {"BTC-USD": {"max_position": "10", "price_collar": "0.01"}}


def test_to_wire_when_defaults_then_every_limit_key_is_present() -> None:
    assert Limits().to_wire() == {
        "max_exposure": "1000000",
        "max_account_exposure": "1000000",
        "max_position": "1000000",
        "max_order_qty": "1000000",
        "max_order_notional": "1000000",
        "price_collar": "0.1",
        "max_orders_per_second": 1000,
        "restricted_symbols": [],
        "reservation_ttl_ms": 5000,
        "auto_reduce_on_breach": True,
        "symbols": {},
    }


def test_limits_when_built_from_a_dict_then_later_changes_to_the_dict_do_not_leak() -> None:
    overrides = {"BTC-USD": SymbolLimits(max_position=Decimal("1"))}
    limits = Limits(symbols=overrides)

    overrides["ETH-USD"] = SymbolLimits(max_position=Decimal("2"))

    assert isinstance(limits.symbols, MappingProxyType)
    assert "ETH-USD" not in limits.symbols
    assert limits.for_symbol("ETH-USD").max_position == Decimal("1000000")
    with pytest.raises(TypeError):
        limits.symbols["X"] = SymbolLimits()  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_exposure = Decimal(1)  # type: ignore[misc]


# --- command-line overrides ---------------------------------------------------


def test_with_overrides_when_flags_given_then_only_those_values_change() -> None:
    cfg = GatewayConfig()

    changed = with_overrides(cfg, host="0.0.0.0", port=9000, state_dir=Path("elsewhere"))

    assert changed.server == dataclasses.replace(cfg.server, host="0.0.0.0", port=9000)
    assert changed.persistence.state_dir == Path("elsewhere")
    assert with_overrides(cfg) == cfg


def test_with_overrides_when_port_out_of_range_then_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^--port: expected an integer from 0 to 65535"):
        with_overrides(GatewayConfig(), port=65536)
