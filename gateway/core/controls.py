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

    # ------------------------------------------- documents shared with others

    def modes_document(self, change: EmergencyRecord | None = None) -> dict[str, Any]:
        """Every scope's mode as the journal will say once every staged change
        (and ``change``) is published: ``{"version", "gateway": MODE,
        "accounts": {account: MODE}}``, each MODE ``{"m", "r", "by", "at"}``
        (accounts in ``normal`` left out). What engines sharing their modes
        exchange; ``converge_modes`` reads it."""
        state = self._state
        modes = state.modes
        gateway = _mode_doc(
            modes.gateway.mode.value,
            modes.gateway.reason,
            modes.gateway.actor,
            modes.gateway.since_ms,
        )
        accounts = {
            a: _mode_doc(m.mode.value, m.reason, m.actor, m.since_ms)
            for a, m in modes.accounts.items()
        }
        version = modes.version
        staged = list(state.staging.emergencies())
        if change is not None:
            staged.append(change)
        for rec in staged:
            doc = _mode_doc(rec["m"], rec["r"], rec["by"], rec["at"])
            if rec["a"] is None:
                gateway = doc
            elif rec["m"] == Mode.NORMAL.value:
                accounts.pop(rec["a"], None)
            else:
                accounts[rec["a"]] = doc
            version = max(version, rec["v"])
        return {"version": version, "gateway": gateway, "accounts": dict(sorted(accounts.items()))}

    def converge_modes(self, document: Mapping[str, Any]) -> list[EmergencyRecord]:
        """The ``emg`` records (each of the document's version) that bring the
        modes to ``document`` (a ``modes_document``): one per scope whose
        mode, reason or actor differs; none when the document's version is
        not above the intended one."""
        version = document["version"]
        state = self._state
        if version <= state.staging.next_version("emg", state.modes.version) - 1:
            return []
        current = self.modes_document()
        records: list[EmergencyRecord] = []
        wanted, have = document["gateway"], current["gateway"]
        if _differs(wanted, have):
            records.append(_record_of(None, wanted, version))
        accounts_now: Mapping[str, Any] = current["accounts"]
        accounts_wanted: Mapping[str, Any] = document["accounts"]
        for account in sorted(set(accounts_now) | set(accounts_wanted)):
            want = accounts_wanted.get(account)
            have = accounts_now.get(account)
            if want is None:
                assert have is not None
                records.append(
                    emergency_record(
                        account, Mode.NORMAL.value, "", wanted["by"], wanted["at"], version
                    )
                )
            elif have is None or _differs(want, have):
                records.append(_record_of(account, want, version))
        if not records:
            # Same modes under a newer version: the version still moves.
            records.append(_record_of(None, wanted, version))
        return records

    def limits_document(self, change: LimitsRecord | None = None) -> dict[str, Any]:
        """The limits as the journal will say (with ``change``): ``{"version",
        "limits", "by", "at"}``, what engines sharing their limits exchange."""
        if change is not None:
            return {
                "version": change["v"],
                "limits": change["limits"],
                "by": change["by"],
                "at": change["at"],
            }
        version, limits, _file = self._intended_limits()
        return {"version": version, "limits": limits.to_wire(), "by": "", "at": 0}

    def converge_limits(
        self, document: Mapping[str, Any], *, same_version: bool = False
    ) -> LimitsRecord | None:
        """The ``lim`` record that brings the limits to ``document`` (a
        ``limits_document``), or None when its version is not above the
        intended one (with ``same_version``: also when equal, if the limits
        differ). Raises ``ConfigError`` naming the key of a bad value."""
        version, limits, _file = self._intended_limits()
        new = Limits.from_mapping(document["limits"], where="shared limits")
        if document["version"] < version or (
            document["version"] == version and (not same_version or new == limits)
        ):
            return None
        return {
            "t": "lim",
            "v": document["version"],
            "limits": new.to_wire(),
            "by": document["by"],
            "at": document["at"],
        }

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


def _mode_doc(mode: str, reason: str, actor: str, at_ms: int) -> dict[str, Any]:
    return {"m": mode, "r": reason, "by": actor, "at": at_ms}


def _differs(want: Mapping[str, Any], have: Mapping[str, Any]) -> bool:
    return (want["m"], want["r"], want["by"], want["at"]) != (
        have["m"],
        have["r"],
        have["by"],
        have["at"],
    )


def _record_of(account: str | None, mode: Mapping[str, Any], version: int) -> EmergencyRecord:
    return emergency_record(account, mode["m"], mode["r"], mode["by"], mode["at"], version)
