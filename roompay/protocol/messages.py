"""Typed payloads of the device link, validated in both directions.

Every payload is compact JSON. Timestamps must carry a time zone so that a device
and the server never compare naive and aware times. Fields that are None are left
out on the wire (`{"state":"lost","boot_id":3}` is a complete last will).
"""

import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal, Self, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    NonNegativeInt,
    PositiveInt,
    StringConstraints,
    ValidationError,
    model_validator,
)

from roompay.protocol.errors import ProtocolError

Id = Annotated[str, StringConstraints(min_length=1, max_length=128)]
"""An identifier chosen by one side and echoed by the other (cmd_id, order_id, run_id)."""


class AckStatus(StrEnum):
    """How a device answered a command."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"


class RejectReason(StrEnum):
    """Why a device rejected a command; `CommandAck.reason` carries one of these."""

    BAD_PAYLOAD = "bad_payload"
    EXPIRED = "expired"
    BUSY = "busy"
    BAD_SIG = "bad_sig"
    REPLAY = "replay"
    FAULT = "fault"
    NOT_RUNNING = "not_running"


class RunEventKind(StrEnum):
    """The steps of one run of the appliance."""

    STARTED = "started"
    PROGRESS = "progress"
    ENDED = "ended"


class EndReason(StrEnum):
    """Why a run ended."""

    COMPLETED = "completed"
    REMOTE_STOP = "remote_stop"
    POWER_LOSS = "power_loss"
    FAULT = "fault"
    LOCAL_STOP = "local_stop"


class DevicePresence(StrEnum):
    """What the retained state topic says about a device.

    `offline` is a clean shutdown; `lost` is the last will the broker publishes when
    the connection dies without a DISCONNECT.
    """

    ONLINE = "online"
    OFFLINE = "offline"
    LOST = "lost"


class Message(BaseModel):
    """Base of every payload: unknown fields are an error, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


KeyId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]
"""Names the device key a command is signed with, so that keys can be rotated."""

Signature = Annotated[str, StringConstraints(min_length=1, max_length=128)]
"""HMAC-SHA256 of the command's canonical bytes, base64url without padding."""


def _check_expiry(issued_at: datetime, expires_at: datetime) -> None:
    if expires_at <= issued_at:
        raise ValueError("expires_at must be later than issued_at")


class StartCommandBody(Message):
    """Every field of a start command that its signature covers; see `StartCommand`."""

    v: Literal[1] = 1
    cmd_id: Id
    order_id: Id
    program: Id
    duration_s: PositiveInt
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    seq: NonNegativeInt
    key_id: KeyId

    @model_validator(mode="after")
    def _expires_after_issue(self) -> Self:
        _check_expiry(self.issued_at, self.expires_at)
        return self


class StartCommand(StartCommandBody):
    """Server -> device: run `program` for `duration_s` seconds, unless past `expires_at`.

    `seq` rises with every command the server issues to the device; `sig` signs the
    rest with the device key named by `key_id` (`roompay.protocol.signing`).
    """

    sig: Signature


class StopCommandBody(Message):
    """Every field of a stop command that its signature covers; see `StopCommand`."""

    cmd_id: Id
    run_id: Id
    order_id: Id
    reason: Id
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    seq: NonNegativeInt
    key_id: KeyId

    @model_validator(mode="after")
    def _expires_after_issue(self) -> Self:
        _check_expiry(self.issued_at, self.expires_at)
        return self


class StopCommand(StopCommandBody):
    """Server -> device: end run `run_id` now; the device reports it as `remote_stop`.

    `reason` is the server's own words (for example `guest_request`) and is only logged.
    """

    sig: Signature


class CommandAck(Message):
    """Device -> server: the answer to one command, keyed by its `cmd_id`."""

    cmd_id: Id
    status: AckStatus
    reason: str | None = None
    run_id: Id | None = None
    ts: AwareDatetime


class RunEvent(Message):
    """Device -> server: one step of a run; `seq` rises by one per event within a run."""

    run_id: Id
    cmd_id: Id
    order_id: Id
    event: RunEventKind
    seq: NonNegativeInt
    elapsed_s: NonNegativeInt
    remaining_s: NonNegativeInt
    ts: AwareDatetime
    reason: EndReason | None = None
    actual_run_s: NonNegativeInt | None = None

    @model_validator(mode="after")
    def _end_fields_only_on_end(self) -> Self:
        ended = self.event is RunEventKind.ENDED
        if ended != (self.reason is not None) or ended != (self.actual_run_s is not None):
            raise ValueError("reason and actual_run_s belong on ended events and only there")
        return self


class StateMessage(Message):
    """Device -> server, retained: whether the device is there, numbered by boot."""

    state: DevicePresence
    boot_id: NonNegativeInt
    fw: str | None = None
    ts: AwareDatetime | None = None


class Heartbeat(Message):
    """Device -> server, QoS 0: the device is alive and this is its relay."""

    uptime_s: NonNegativeInt
    relay_on: bool
    run_id: Id | None = None
    ts: AwareDatetime


FaultCode = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]
"""The appliance's own name for a fault, for example `heater_overtemp` or `E07`."""


class FaultEvent(Message):
    """Device -> server, retained: the appliance's fault `fault` is raised or cleared.

    `active` true raises it: the device ends any run as `fault` and refuses starts.
    `active` false clears it (repaired). Retained, so the last word survives a server
    that was away; `ts` orders the reports, and an older one never overrides a newer one.
    """

    fault: FaultCode
    active: bool
    ts: AwareDatetime


class RunAck(Message):
    """Server -> device: every event of run `run_id` up to `seq` is stored; drop them."""

    run_id: Id
    seq: NonNegativeInt


class ActiveRun(Message):
    """The run a device was in when it booted, as it goes on after the boot."""

    run_id: Id
    order_id: Id
    cmd_id: Id
    elapsed_s: NonNegativeInt
    remaining_s: NonNegativeInt


class BootEvent(Message):
    """Device -> server, once per boot after the birth: what survived the restart.

    `active_run` is the run the device resumed (None if it had none or ended it as
    `power_loss`); `unsent_results` counts run events still waiting for a `run_ack`.
    """

    boot_id: NonNegativeInt
    fw: str
    active_run: ActiveRun | None = None
    unsent_results: NonNegativeInt
    ts: AwareDatetime


M = TypeVar("M", bound=Message)


def encode(message: Message) -> bytes:
    """Serialise a message to compact JSON, leaving out fields that are None."""
    return message.model_dump_json(exclude_none=True).encode()


def decode(model_cls: type[M], payload: bytes) -> M:
    """Parse and validate a payload, or raise ProtocolError."""
    try:
        return model_cls.model_validate_json(payload)
    except ValidationError as exc:
        raise ProtocolError(f"invalid {model_cls.__name__}: {_summary(exc)}") from exc


def peek_cmd_id(payload: bytes) -> str | None:
    """Return the `cmd_id` of a payload that failed validation, if one can be read."""
    try:
        document = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict):
        return None
    cmd_id = document.get("cmd_id")
    if isinstance(cmd_id, str) and 0 < len(cmd_id) <= 128:
        return cmd_id
    return None


def _summary(exc: ValidationError) -> str:
    """Say what was wrong without echoing the payload back into the logs."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or '<root>'}: {error['msg']}"
        for error in exc.errors(include_input=False, include_url=False)
    )


__all__ = [
    "AckStatus",
    "ActiveRun",
    "BootEvent",
    "CommandAck",
    "DevicePresence",
    "EndReason",
    "FaultEvent",
    "Heartbeat",
    "Message",
    "RejectReason",
    "RunAck",
    "RunEvent",
    "RunEventKind",
    "StartCommand",
    "StartCommandBody",
    "StateMessage",
    "StopCommand",
    "StopCommandBody",
    "decode",
    "encode",
    "peek_cmd_id",
]
