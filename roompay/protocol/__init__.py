"""The device link's wire contract: topics, payloads and broker addresses.

Nothing here opens a socket; the server (`roompay.iot`) and the device
(`roompay.device`) both build on it.
"""

from roompay.protocol.errors import ConnectError, InvalidTopicError, LinkError, ProtocolError
from roompay.protocol.mqtt_url import MqttEndpoint, parse_mqtt_url
from roompay.protocol.topics import (
    CommandName,
    EventName,
    ParsedTopic,
    TopicKind,
    Topics,
)

__all__ = [
    "CommandName",
    "ConnectError",
    "EventName",
    "InvalidTopicError",
    "LinkError",
    "MqttEndpoint",
    "ParsedTopic",
    "ProtocolError",
    "TopicKind",
    "Topics",
    "parse_mqtt_url",
]
