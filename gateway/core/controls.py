"""Requests that change the emergency modes or the limits.

Each turns a request into its journal record (``emg`` or ``lim``) against
what the journal will say once every staged change is published (the
*intended* mode, limits and versions), so two changes staged in a row get
consecutive versions and a repeat of a staged change is no change.
``RiskEngine`` exposes these methods; ``stage`` their records next.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.core.limits import LimitChange, Limits, file_limits_change, limits_change
from gateway.core.modes import GATEWAY_ACTOR
from gateway.core.records import EmergencyRecord, LimitsRecord, emergency_record
from gateway.core.state import RiskState
from protocol.codes import ErrorCode, Mode
from protocol.errors import ProtocolError
from protocol.messages import EmergencySet


class Controls:
    """Emergency and limits changes over one ``RiskState``."""

    __slots__ = ("_state",)

    def __init__(self, state: RiskState) -> None:
        self._state = state

    def prepare_emergency(
        self, request: EmergencySet, actor: str, now_ms: int
    ) -> EmergencyRecord | None:
        """The journal record for a mode change, or ``None`` when it changes
        nothing. Nothing is applied: ``stage`` it next."""
        if self._intended_mode(request.account) is request.mode:
            return None
        state = self._state
        version = state.staging.next_version("emg", state.modes.version)
        mode = request.mode.value
        return emergency_record(request.account, mode, request.reason, actor, now_ms, version)

    def _intended_mode(self, account: str | None) -> Mode:
        staged = self._state.staging.intended(account)
        return self._state.modes.mode_of(account) if staged is None else Mode(staged["m"])

    def record_initial_state(self, now_ms: int) -> None:
        """A fresh state directory: journal the initial mode (normal since
        ``now_ms``, version 0) so that every restart shows the same ``since``."""
        self._state.replay(
            [emergency_record(None, Mode.NORMAL.value, "", GATEWAY_ACTOR, now_ms, 0)]
        )
        initial = emergency_record(None, Mode.NORMAL.value, "", GATEWAY_ACTOR, now_ms, 0)
        self._state.records.append(initial)

    def force_halt(self, reason: str, now_ms: int, *, durable: bool = True) -> None:
        """The gateway halts itself (recovery damage, persistence failure).

        Also when already halted, so that the reason says why it must stay so.
        ``durable``: staged like any change. Without (the journal has failed,
        nothing can be written), applied at once and held in memory only.
        """
        state = self._state
        staged = state.staging.intended(None)
        gateway = state.modes.gateway
        if staged is None:
            mode, why = gateway.mode, gateway.reason
        else:
            mode, why = Mode(staged["m"]), staged["r"]
        if mode is Mode.HALTED and why == reason:
            return
        version = state.staging.next_version("emg", state.modes.version)
        rec = emergency_record(None, Mode.HALTED.value, reason, GATEWAY_ACTOR, now_ms, version)
        if durable:
            state.stage(rec)
        else:
            state.apply_emergency(rec)

    def _intended_limits(self) -> tuple[int, Limits, dict[str, Any] | None]:
        """(version, limits, file limits) as the journal will say."""
        in_force = self._state.in_force
        rec = self._state.staging.last_limits()
        if rec is None:
            return in_force.version, in_force.limits, in_force.file
        limits = Limits.from_mapping(rec["limits"], where="staged limits")
        return rec["v"], limits, rec.get("file", in_force.file)

    def prepare_file_limits(
        self, limits: Limits, actor: str, now_ms: int
    ) -> tuple[LimitsRecord | None, list[LimitChange]]:
        """The journal record for the config file's ``[limits]`` (start, SIGHUP)
        and, for the log, ``(key, old, new)`` per key whose value changes (see
        ``gateway.core.limits.file_limits_change``). ``None``: the file is as
        last applied. A record that changes no value keeps the version and
        only moves the file's baseline."""
        version, current, baseline = self._intended_limits()
        found = file_limits_change(current, baseline, limits)
        if found is None:
            return None, []
        new, changed = found
        rec: LimitsRecord = {
            "t": "lim",
            "v": version + 1 if changed else version,
            "limits": new.to_wire(),
            "file": limits.to_wire(),
            "by": actor,
            "at": now_ms,
        }
        return rec, changed

    def prepare_limits(
        self, version: int, changes: Mapping[str, Any], actor: str, now_ms: int
    ) -> LimitsRecord | None:
        """The journal record for ``limits.set`` (``None`` if nothing changes).

        Raises ``ProtocolError(CONFLICT)`` when ``version`` is not current and
        ``ProtocolError(BAD_REQUEST)`` naming the key when a value is wrong.
        """
        current_version, current, _file = self._intended_limits()
        if version != current_version:
            raise ProtocolError(
                ErrorCode.CONFLICT,
                f"params.version is {version} but the limits are at version "
                f"{current_version}; read them again with limits.get",
            )
        new = limits_change(current, changes)
        if new is None:
            return None
        wire = new.to_wire()
        return {"t": "lim", "v": current_version + 1, "limits": wire, "by": actor, "at": now_ms}

    def adopt_file_limits(self, limits: Limits, now_ms: int) -> None:
        """First start on a fresh state directory: the config file's limits are
        version 1, recorded without an alert (nothing changed)."""
        wire = limits.to_wire()
        rec: LimitsRecord = {"t": "lim", "v": 1, "limits": wire, "by": "config", "at": now_ms}
        rec["file"] = wire
        state = self._state
        state.replaying = True
        try:
            state.apply_limits(rec)
        finally:
            state.replaying = False
        state.records.append(rec)
