"""The MQTT topic layout shared by the server and the devices.

    {root}/dev/{code}/state        device -> server, retained; also the last will
    {root}/dev/{code}/cmd/{name}   server -> device
    {root}/dev/{code}/evt/{name}   device -> server

`cmd/` and `evt/` split the directions so that one ACL pattern covers each.
"""

import re
from dataclasses import dataclass
from enum import StrEnum

from roompay.protocol.errors import InvalidTopicError

DEFAULT_ROOT = "roompay/v1"

_CODE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A root is one or more plain levels: no wildcards, no empty levels.
_ROOT = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


class TopicKind(StrEnum):
    """Which of the three branches of a device's topics a topic belongs to."""

    STATE = "state"
    CMD = "cmd"
    EVT = "evt"


class CommandName(StrEnum):
    """Commands the server sends to a device."""

    START = "start"
    STOP = "stop"
    RUN_ACK = "run_ack"
    BOOT_ACK = "boot_ack"


class EventName(StrEnum):
    """Events a device sends to the server."""

    ACK = "ack"
    RUN = "run"
    HB = "hb"
    BOOT = "boot"
    FAULT = "fault"


_COMMAND_NAMES = frozenset(name.value for name in CommandName)
_EVENT_NAMES = frozenset(name.value for name in EventName)


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A topic taken apart; `name` is None for the state topic."""

    code: str
    kind: TopicKind
    name: CommandName | EventName | None

    @property
    def is_answer(self) -> bool:
        """Tell whether this is a device's answer to a command (`evt/ack`): the server
        handles those before the device's other waiting messages (its deadline runs)."""
        return self.kind is TopicKind.EVT and self.name is EventName.ACK


def is_valid_code(code: str) -> bool:
    """Tell whether `code` is a well-formed device code."""
    return _CODE.fullmatch(code) is not None


def check_code(code: str) -> str:
    """Return `code` unchanged, or raise InvalidTopicError if it is malformed."""
    if not is_valid_code(code):
        raise InvalidTopicError(f"invalid device code {code!r}: want [A-Za-z0-9_-]{{1,64}}")
    return code


class Topics:
    """Builds and parses every topic under one root."""

    def __init__(self, root: str = DEFAULT_ROOT) -> None:
        if _ROOT.fullmatch(root) is None:
            raise InvalidTopicError(f"invalid topic root {root!r}")
        self._root = root
        self._prefix = f"{root}/dev/"

    @property
    def root(self) -> str:
        """Return the root every topic starts with."""
        return self._root

    def device(self, code: str) -> str:
        """Return the base topic of one device."""
        return f"{self._prefix}{check_code(code)}"

    def state(self, code: str) -> str:
        """Return the retained presence topic of a device."""
        return f"{self.device(code)}/{TopicKind.STATE}"

    def command(self, code: str, name: CommandName) -> str:
        """Return the topic of command `name` to a device."""
        return f"{self.device(code)}/{TopicKind.CMD}/{CommandName(name)}"

    def event(self, code: str, name: EventName) -> str:
        """Return the topic of event `name` from a device."""
        return f"{self.device(code)}/{TopicKind.EVT}/{EventName(name)}"

    def device_subscription(self, code: str) -> str:
        """Return the pattern a device subscribes to: its own commands and nothing else."""
        return f"{self.device(code)}/{TopicKind.CMD}/#"

    def server_subscriptions(self) -> tuple[str, ...]:
        """Return the patterns the server subscribes to: every device's events and state."""
        return (
            f"{self._prefix}+/{TopicKind.EVT}/#",
            f"{self._prefix}+/{TopicKind.STATE}",
        )

    def parse(self, topic: str) -> ParsedTopic:
        """Take a topic apart, or raise InvalidTopicError if it is not in this layout."""
        if not topic.startswith(self._prefix):
            raise InvalidTopicError(f"topic {topic!r} is not under {self._prefix!r}")
        levels = topic[len(self._prefix) :].split("/")
        code = levels[0]
        if not is_valid_code(code):
            raise InvalidTopicError(f"topic {topic!r} has an invalid device code")
        match levels[1:]:
            case [TopicKind.STATE]:
                return ParsedTopic(code, TopicKind.STATE, None)
            case [TopicKind.CMD, name] if name in _COMMAND_NAMES:
                return ParsedTopic(code, TopicKind.CMD, CommandName(name))
            case [TopicKind.EVT, name] if name in _EVENT_NAMES:
                return ParsedTopic(code, TopicKind.EVT, EventName(name))
        raise InvalidTopicError(f"topic {topic!r} is not a state, cmd or evt topic")
