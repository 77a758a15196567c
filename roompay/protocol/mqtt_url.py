"""Where the broker is: `mqtt://[user:pass@]host[:port]`."""

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

DEFAULT_PORT = 1883


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    """A broker address and the credentials to log in with."""

    host: str
    port: int = DEFAULT_PORT
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id_prefix: str = "roompay"

    @property
    def url(self) -> str:
        """Return the endpoint as a URL without the password."""
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{user}{host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttEndpoint:
    """Parse `mqtt://[user:pass@]host[:port]`, or raise ValueError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "mqtt":
        raise ValueError(f"MQTT URL must start with mqtt:// (TLS is not supported yet): {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"MQTT URL takes no path, query or fragment: {url!r}")
    if not parts.hostname:
        raise ValueError(f"MQTT URL has no host: {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"MQTT URL has an invalid port: {url!r}") from exc
    if port == 0:
        raise ValueError(f"MQTT URL has an invalid port: {url!r}")
    if (parts.username is None) != (parts.password is None):
        raise ValueError(f"MQTT URL needs both user and password, or neither: {url!r}")
    return MqttEndpoint(
        host=parts.hostname,
        port=DEFAULT_PORT if port is None else port,
        username=None if parts.username is None else unquote(parts.username),
        password=None if parts.password is None else unquote(parts.password),
    )
