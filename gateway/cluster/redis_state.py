"""``SharedState`` on one Redis server (7.0 or newer), through redis-py's
asyncio client with hiredis.

Every method is one Lua script (``gateway.cluster.scripts``) or one read, run
under a deadline (``timeout_ms``): a Redis that refuses, resets or hangs
(SIGSTOP) raises ``SharedStateUnavailable`` after at most that long, never a
hang. A request whose connection broke (Redis restarted since the last one)
is sent once more on a new connection: every script is safe to repeat (a
credit request carries its sequence, a document write its expected version,
and ``SharedDocuments`` recognises its own write in a conflict), so a repeat
never applies a change twice; a timeout is never retried.
``tail`` blocks on its own connection (``XREAD BLOCK``, never ``BLOCK 0``)
so it never holds up a credit request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.cluster import scripts
from gateway.cluster.shared import (
    DOCUMENTS,
    Beat,
    CreditAnswer,
    CreditKind,
    Document,
    DocumentName,
    DurabilityRefused,
    Joined,
    Member,
    NotForgettable,
    OwnershipRefused,
    SharedStateError,
    SharedStateUnavailable,
    Written,
)

__all__ = ["KEY_PREFIX", "RedisState", "open_redis_state"]

KEY_PREFIX = "riskgw:"
MIN_VERSION = (7, 0)

T = TypeVar("T")


def _client(url: str, timeout_s: float) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        retry_on_timeout=False,
        health_check_interval=0,
        client_name="risk-gateway",
    )


async def open_redis_state(url: str, *, timeout_ms: int, prefix: str = KEY_PREFIX) -> RedisState:
    """A handle on the Redis at ``url`` (``redis://host:port/db``); it
    connects on first use."""
    return RedisState(url, timeout_ms=timeout_ms, prefix=prefix)


def _members(rows: list[Any], alive_ms: int) -> tuple[Member, ...]:
    members = []
    for row in rows:
        name, url, accounts, unseen, credit, exposure, applied_e, applied_l = row
        unseen_ms = int(unseen)
        members.append(
            Member(
                name=name,
                url=url,
                accounts=tuple(sorted(accounts)),
                alive=0 <= unseen_ms <= alive_ms,
                unseen_ms=unseen_ms,
                credit_units=int(credit),
                exposure=exposure or None,
                applied={"emergency": int(applied_e), "limits": int(applied_l)},
            )
        )
    return tuple(sorted(members, key=lambda m: m.name))


class RedisState:
    """One member's handle on the shared state in Redis."""

    def __init__(self, url: str, *, timeout_ms: int, prefix: str = KEY_PREFIX) -> None:
        self.url = url
        self.timeout_s = timeout_ms / 1000
        self.keys = [prefix + name for name in scripts.KEY_NAMES]
        self._redis = _client(url, self.timeout_s)
        # XREAD BLOCK holds its connection: give it one of its own, with a
        # socket timeout above the longest block.
        self._tail_redis = _client(url, self.timeout_s + 2.0)
        self._join = self._redis.register_script(scripts.JOIN)
        self._beat = self._redis.register_script(scripts.BEAT)
        self._write = self._redis.register_script(scripts.WRITE_DOCUMENT)
        self._restore = self._redis.register_script(scripts.RESTORE_DOCUMENT)
        self._credit = self._redis.register_script(scripts.CREDIT)
        self._recover = self._redis.register_script(scripts.BEGIN_RECOVERY)
        self._forget = self._redis.register_script(scripts.FORGET)
        self._members = self._redis.register_script(scripts.MEMBERS)

    def _key(self, name: str) -> str:
        return self.keys[scripts.KEY_NAMES.index(name)]

    async def _call(self, what: str, step: Callable[[], Awaitable[T]], *, extra_s: float = 0) -> T:
        try:
            async with asyncio.timeout(self.timeout_s + extra_s):
                return await step()
        except TimeoutError:
            raise SharedStateUnavailable(
                f"Redis at {self.url} did not answer {what} within {self.timeout_s * 1000:.0f} ms"
            ) from None
        except (RedisError, OSError) as error:
            raise SharedStateUnavailable(f"Redis at {self.url}: {what}: {error}") from None
        except Exception as error:
            # The client's transport failed under it (a connection reset
            # while it was being set up surfaces as RuntimeError from the
            # event loop): drop every connection and answer unavailable.
            for client in (self._redis, self._tail_redis):
                with contextlib.suppress(Exception):
                    await client.connection_pool.disconnect()
            raise SharedStateUnavailable(
                f"Redis at {self.url}: {what}: {type(error).__name__}: {error}"
            ) from None

    # ------------------------------------------------------------ start

    async def check_durability(self) -> None:
        async def read() -> tuple[dict[Any, Any], dict[str, Any]]:
            try:
                config = dict(await self._redis.config_get("append*"))
            except RedisError as error:
                if "unknown command" in str(error).lower():
                    raise DurabilityRefused(
                        f"Redis at {self.url} does not allow CONFIG GET, so its appendonly and "
                        "appendfsync settings cannot be checked"
                    ) from None
                raise
            info = await self._redis.info("server")
            return config, info

        config, info = await self._call("CONFIG GET", read)
        version_text = str(info.get("redis_version", "0"))
        try:
            version = tuple(int(part) for part in version_text.split(".")[:2])
        except ValueError:
            version = (0, 0)
        if version < MIN_VERSION:
            raise DurabilityRefused(
                f"Redis at {self.url} is version {version_text}; a cluster needs 7.0 or newer"
            )
        if config.get("appendonly") != "yes":
            raise DurabilityRefused(
                f"Redis at {self.url} has appendonly {config.get('appendonly')!r}; a cluster "
                "needs appendonly yes (every acknowledged write in the append-only file)"
            )
        if config.get("appendfsync") != "always":
            raise DurabilityRefused(
                f"Redis at {self.url} has appendfsync {config.get('appendfsync')!r}; a cluster "
                "needs appendfsync always (each write on disk before Redis answers)"
            )

    async def join(
        self, name: str, url: str, accounts: Sequence[str], *, alive_ms: int, epoch: str
    ) -> Joined:
        answer = await self._call(
            "join",
            lambda: self._join(keys=self.keys, args=[name, url, alive_ms, epoch, *accounts]),
        )
        if answer[0] == "owned":
            raise OwnershipRefused(answer[1], answer[2], answer[3])
        return Joined(epoch=answer[1], created=answer[2] == "1")

    # ------------------------------------------------------------ beats

    async def beat(
        self,
        name: str,
        *,
        exposure: str | None,
        applied: Mapping[str, int],
        alive_ms: int,
    ) -> Beat:
        args: list[str | int] = [
            name,
            exposure or "",
            applied.get("emergency", 0),
            applied.get("limits", 0),
        ]
        answer = await self._call("heartbeat", lambda: self._beat(keys=self.keys, args=args))
        epoch, v_emergency, v_limits, forgotten, recovering, units, seq, max_units, total, rows = (
            answer
        )
        return Beat(
            epoch=epoch or None,
            versions={"emergency": int(v_emergency), "limits": int(v_limits)},
            members=_members(rows, alive_ms),
            forgotten=forgotten == "1",
            recovering=tuple(sorted(recovering)),
            credit_units=int(units),
            credit_seq=int(seq),
            max_units=int(max_units),
            total_units=int(total),
        )

    async def members(self, *, alive_ms: int) -> tuple[Member, ...]:
        rows = await self._call("members", lambda: self._members(keys=self.keys, args=[]))
        return _members(rows, alive_ms)

    # -------------------------------------------------------- documents

    async def read_document(self, name: DocumentName) -> Document | None:
        key = self._key(f"doc:{name}")
        values: Any = await self._call(
            f"read {name}", lambda: self._redis.hmget(key, ["v", "body"])
        )
        version, body = values
        if version is None or body is None:
            return None
        return Document(name, int(version), str(body))

    async def write_document(
        self, name: DocumentName, expected_version: int, body: str, *, max_units: int | None = None
    ) -> Written:
        args = [name, expected_version, body, "" if max_units is None else max_units]
        ok, version = await self._call(
            f"write {name}", lambda: self._write(keys=self.keys, args=args)
        )
        return Written(ok == "1", int(version))

    async def restore_document(
        self, name: DocumentName, version: int, body: str, *, max_units: int | None = None
    ) -> bool:
        args = [name, version, body, "" if max_units is None else max_units]
        done = await self._call(f"restore {name}", lambda: self._restore(keys=self.keys, args=args))
        return bool(done == "1")

    async def tail(self, after: Mapping[DocumentName, int], block_ms: int) -> list[Document]:
        streams = {self._key(f"log:{name}"): f"{after.get(name, 0)}-0" for name in DOCUMENTS}
        by_key = {self._key(f"log:{name}"): name for name in DOCUMENTS}
        answer: Any = await self._call(
            "tail",
            lambda: self._tail_redis.xread(streams, block=max(block_ms, 1)),  # type: ignore[arg-type]
            extra_s=block_ms / 1000,
        )
        documents: list[Document] = []
        for key, entries in answer or []:
            name = by_key[key]
            for entry_id, fields in entries:
                version = int(entry_id.split("-", 1)[0])
                documents.append(Document(name, version, fields["body"]))
        documents.sort(key=lambda d: (d.name, d.version))
        return documents

    # ----------------------------------------------------------- credit

    async def credit(self, name: str, seq: int, units: int, kind: CreditKind) -> CreditAnswer:
        units_s, seq_s, max_s, total_s, recovering = await self._call(
            "credit", lambda: self._credit(keys=self.keys, args=[name, seq, units, kind])
        )
        return CreditAnswer(
            units=int(units_s),
            seq=int(seq_s),
            max_units=int(max_s),
            total_units=int(total_s),
            recovering=tuple(sorted(recovering)),
        )

    async def begin_recovery(self, known_members: Sequence[str], epoch: str) -> str:
        stored = await self._call(
            "begin recovery",
            lambda: self._recover(keys=self.keys, args=[epoch, *known_members]),
        )
        return str(stored)

    async def forget(self, name: str, *, min_unseen_ms: int) -> None:
        answer = await self._call(
            "forget", lambda: self._forget(keys=self.keys, args=[name, min_unseen_ms])
        )
        if answer[0] != "ok":
            raise NotForgettable(answer[1])

    async def close(self) -> None:
        for client in (self._redis, self._tail_redis):
            try:
                await client.aclose()
            except (RedisError, OSError) as error:  # pragma: no cover - best effort
                raise SharedStateError(str(error)) from None
