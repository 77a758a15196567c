"""Errors of the device link. Every failure at the MQTT edge has a type here.

LinkError
├── ProtocolError         a payload that is not JSON or does not match its message schema
│   └── InvalidTopicError a topic or device code outside the layout (also a ValueError)
└── ConnectError          the broker refused the connection or did not answer in time
"""


class LinkError(Exception):
    """Base class of every error the device link raises."""


class ProtocolError(LinkError):
    """A payload is not valid JSON or does not match its message schema."""


class InvalidTopicError(ProtocolError, ValueError):
    """A topic, root or device code does not fit the topic layout."""


class ConnectError(LinkError):
    """The broker refused the connection or did not acknowledge it in time."""
