"""Replay files: NDJSON requests sent to a gateway, and what came back.

A replay file holds one request per line exactly as PROTOCOL section 2 writes
it, ``{"id": ..., "method": ..., "params": {...}}``, optionally with ``"t"``:
milliseconds since the start of the recording. Blank lines are skipped.
``load_requests`` checks every line before anything is sent and names the line
of the first bad one.

``replay`` sends the requests in file order over one connection, either on
their ``t`` (scaled by ``speed``) or as fast as possible, with at most
``window`` requests in flight either way. The gateway handles one connection's
requests in the order they arrive, so the decisions do not depend on the pace
(unless the file relies on time itself: rate limits, reservation expiry).

An expectations file has lines ``{"id": ..., "decision": "accept"|"reject"}``
(``record_decisions`` writes them, with ``reasons`` as well); ``compare``
lists the request ids whose decision differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from clients.client import GatewayClient, GatewayError

__all__ = [
    "Outcome",
    "ReplayAborted",
    "ReplayFileError",
    "ReplayReport",
    "ReplayRequest",
    "compare",
    "load_expectations",
    "load_requests",
    "replay",
    "summarize",
    "write_decisions",
]

RequestId = int | str
_REQUEST_KEYS = frozenset({"id", "method", "params", "t"})
_DECISIONS = ("accept", "reject")
MAX_ID_CHARS = 64


class ReplayFileError(ValueError):
    """A replay or expectations file line that cannot be used; names the file and line."""

    def __init__(self, path: Path | str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = str(path)
        self.line = line


class ReplayAborted(ConnectionError):
    """The connection was lost mid-replay; ``outcomes`` holds what completed."""

    def __init__(self, message: str, outcomes: list[Outcome]) -> None:
        super().__init__(message)
        self.outcomes = outcomes


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayRequest:
    line: int
    id: RequestId
    method: str
    params: dict[str, Any] | None
    t_ms: float | None = None


@dataclass(slots=True, kw_only=True)
class Outcome:
    """What one request got: a result or an error code, and how long it took."""

    request: ReplayRequest
    ok: bool
    latency_ms: float
    result: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None

    @property
    def decision(self) -> str | None:
        if self.ok and self.result is not None and self.request.method == "order.validate":
            value = self.result.get("decision")
            return value if isinstance(value, str) else None
        return None

    @property
    def reason_codes(self) -> list[str]:
        if self.result is None:
            return []
        reasons = self.result.get("reasons")
        if not isinstance(reasons, list):
            return []
        return [str(r.get("code")) for r in reasons if isinstance(r, dict)]


@dataclass(slots=True)
class ReplayReport:
    """The totals of a replay: what ``--json`` prints."""

    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def latency(self) -> dict[str, float]:
        ordered = sorted(self.latencies_ms)
        return {
            "p50": round(_percentile(ordered, 50), 3),
            "p99": round(_percentile(ordered, 99), 3),
            "max": round(ordered[-1], 3) if ordered else 0.0,
        }

    def to_json(self) -> dict[str, Any]:
        decisions = {name: self.decisions.get(name, 0) for name in _DECISIONS}
        for name, count in sorted(self.decisions.items()):
            decisions.setdefault(name, count)
        return {
            "sent": self.sent,
            "ok": self.ok,
            "errors": dict(sorted(self.errors.items())),
            "decisions": decisions,
            "reasons": dict(sorted(self.reasons.items())),
            "latency_ms": self.latency(),
        }


def _percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of sorted values (0 for none)."""
    if not ordered:
        return 0.0
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


# ----------------------------------------------------------------- reading


def _load_lines(path: Path) -> Iterable[tuple[int, Any]]:
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    yield number, orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    raise ReplayFileError(path, number, f"not valid JSON ({exc})") from None
    except OSError as exc:
        raise ReplayFileError(path, 0, f"cannot read: {exc.strerror or exc}") from None


def _request_id(path: Path, number: int, obj: Mapping[str, Any]) -> RequestId:
    if "id" not in obj:
        raise ReplayFileError(path, number, "id is required")
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, int | str):
        raise ReplayFileError(path, number, f"id must be an integer or a string, was {rid!r}")
    if isinstance(rid, str) and len(rid) > MAX_ID_CHARS:
        raise ReplayFileError(path, number, f"id must be at most {MAX_ID_CHARS} characters")
    return rid


def load_requests(path: Path | str) -> list[ReplayRequest]:
    """Read and check a replay file; ``ReplayFileError`` names the first bad line.

    Each line: an object with ``id`` (integer or string, unique in the file),
    ``method`` (string), ``params`` (object, optional) and ``t`` (number of
    milliseconds >= 0, optional, never decreasing). Other keys are refused.
    """
    path = Path(path)
    requests: list[ReplayRequest] = []
    seen: dict[RequestId, int] = {}
    last_t = 0.0
    for number, obj in _load_lines(path):
        if not isinstance(obj, dict):
            raise ReplayFileError(path, number, "a request must be a JSON object")
        extra = sorted(set(obj) - _REQUEST_KEYS)
        if extra:
            raise ReplayFileError(
                path, number, f"{extra[0]} is not a field of a request (id, method, params, t)"
            )
        rid = _request_id(path, number, obj)
        if rid in seen:
            raise ReplayFileError(path, number, f"id {rid!r} already used on line {seen[rid]}")
        seen[rid] = number
        method = obj.get("method")
        if not isinstance(method, str) or not method:
            raise ReplayFileError(path, number, "method must be a non-empty string")
        params = obj.get("params")
        if params is not None and not isinstance(params, dict):
            raise ReplayFileError(path, number, "params must be an object")
        t = obj.get("t")
        t_ms: float | None = None
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, int | float) or t < 0 or t != t:
                raise ReplayFileError(path, number, f"t must be milliseconds >= 0, was {t!r}")
            if t < last_t:
                raise ReplayFileError(path, number, f"t goes back in time ({t} after {last_t:g})")
            t_ms = last_t = float(t)
        requests.append(ReplayRequest(line=number, id=rid, method=method, params=params, t_ms=t_ms))
    return requests


def load_expectations(path: Path | str) -> dict[RequestId, str]:
    """``{id: "accept"|"reject"}`` from lines ``{"id", "decision", ...}``."""
    path = Path(path)
    expected: dict[RequestId, str] = {}
    for number, obj in _load_lines(path):
        if not isinstance(obj, dict):
            raise ReplayFileError(path, number, "an expectation must be a JSON object")
        rid = _request_id(path, number, obj)
        decision = obj.get("decision")
        if decision not in _DECISIONS:
            raise ReplayFileError(
                path, number, f'decision must be "accept" or "reject", was {decision!r}'
            )
        expected[rid] = str(decision)
    return expected


def write_decisions(outcomes: Iterable[Outcome], out: IO[bytes]) -> int:
    """Write ``{"id", "decision", "reasons"}`` per validation; returns the count."""
    count = 0
    for outcome in outcomes:
        decision = outcome.decision
        if decision is None:
            continue
        line = {"id": outcome.request.id, "decision": decision, "reasons": outcome.reason_codes}
        out.write(orjson.dumps(line) + b"\n")
        count += 1
    return count


# ---------------------------------------------------------------- sending


async def replay(
    client: GatewayClient,
    requests: Sequence[ReplayRequest],
    *,
    speed: float | None = 1.0,
    window: int = 64,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Send ``requests`` in order; return one ``Outcome`` each, in file order.

    ``speed`` scales the ``t`` of each request (2.0: twice as fast); ``None``
    sends as fast as ``window`` (requests in flight) allows. A request without
    an answer within the client's ``request_timeout`` counts as error ``TIMEOUT``. Raises
    ``ReplayAborted`` when the connection is lost (the outcomes so far attached).
    """
    if window < 1:
        raise ValueError("window must be at least 1")
    if speed is not None and speed <= 0:
        raise ValueError("speed must be greater than 0")
    timeout = client.request_timeout
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(window)
    outcomes: list[Outcome | None] = [None] * len(requests)
    waiters: set[asyncio.Task[None]] = set()
    lost: list[str] = []
    first_t = next((r.t_ms for r in requests if r.t_ms is not None), 0.0)
    start = loop.time()
    current_t = first_t

    def done(index: int, outcome: Outcome) -> None:
        outcomes[index] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    async def wait(index: int, request: ReplayRequest, sent: float, fut: Any) -> None:
        try:
            async with asyncio.timeout(timeout):
                result = await fut
            outcome = Outcome(request=request, ok=True, latency_ms=_ms_since(sent), result=result)
        except GatewayError as exc:
            outcome = Outcome(
                request=request,
                ok=False,
                latency_ms=_ms_since(sent),
                error_code=exc.code,
                error_message=exc.message,
            )
        except TimeoutError:
            outcome = Outcome(
                request=request,
                ok=False,
                latency_ms=_ms_since(sent),
                error_code="TIMEOUT",
                error_message=f"no answer within {timeout} s",
            )
        except ConnectionError as exc:
            lost.append(str(exc))
            return
        finally:
            slots.release()
        done(index, outcome)

    try:
        for index, request in enumerate(requests):
            if lost:
                break
            if speed is not None:
                if request.t_ms is not None:
                    current_t = request.t_ms
                delay = start + (current_t - first_t) / 1000 / speed - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            await slots.acquire()
            sent = time.perf_counter()
            try:
                fut = await client.send(request.method, request.params)
            except ConnectionError as exc:
                slots.release()
                lost.append(str(exc))
                break
            task = loop.create_task(wait(index, request, sent, fut))
            waiters.add(task)
            task.add_done_callback(waiters.discard)
        if waiters:
            await asyncio.gather(*waiters)
    finally:
        for task in list(waiters):
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*waiters, return_exceptions=True)
    completed = [o for o in outcomes if o is not None]
    if lost:
        raise ReplayAborted(
            f"{lost[0]}; {len(completed)} of {len(requests)} requests completed", completed
        )
    return completed


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def summarize(outcomes: Iterable[Outcome], elapsed_s: float = 0.0) -> ReplayReport:
    report = ReplayReport(elapsed_s=elapsed_s)
    for outcome in outcomes:
        report.sent += 1
        report.latencies_ms.append(outcome.latency_ms)
        if not outcome.ok:
            report.errors[outcome.error_code or "INTERNAL"] += 1
            continue
        report.ok += 1
        decision = outcome.decision
        if decision is not None:
            report.decisions[decision] += 1
            report.reasons.update(outcome.reason_codes)
    return report


def compare(outcomes: Sequence[Outcome], expected: Mapping[RequestId, str]) -> list[str]:
    """One line per expected id whose decision differs (or that got none)."""
    by_id = {outcome.request.id: outcome for outcome in outcomes}
    differences: list[str] = []
    for rid, want in expected.items():
        outcome = by_id.get(rid)
        if outcome is None:
            differences.append(f"id {rid!r}: expected {want}, but the replay has no such request")
            continue
        got = outcome.decision
        if got == want:
            continue
        if got is not None:
            codes = ", ".join(outcome.reason_codes)
            detail = f"got {got}" + (f" ({codes})" if codes else "")
        elif not outcome.ok:
            detail = f"got error {outcome.error_code}: {outcome.error_message}"
        else:
            detail = f"got no decision ({outcome.request.method})"
        differences.append(f"id {rid!r}: expected {want}, {detail}")
    return differences
