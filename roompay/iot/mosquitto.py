"""A Mosquitto 2.0 configuration directory: one identity per device, own topics only.

`write_config` writes three files into one directory (and a `data/` directory for
persistence):

    mosquitto.conf   listener, no anonymous access, the two files below, persistence
    passwd           `user:$7$...` per account (roompay.iot.credentials)
    acl              the backend reads and writes the whole root; each device, through
                     `%u` patterns, reads its own `cmd/#` and writes its own `evt/#` and
                     `state`

`use_username_as_clientid true` makes the username the client id, so a device that
logs in cannot take over another device's session. Mosquitto checks read access on
each delivery, not at SUBSCRIBE: a subscription to another device's topics is granted
but never delivers anything.

Mosquitto started as root drops to the user `mosquitto` unless the config says
`user`; `run_as` writes that line. The files are made readable by that user's group
and `data/` writable by that user when this process may change ownership.
"""

import os
import pwd
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from roompay.iot.credentials import CredentialError, MqttAccount
from roompay.protocol.topics import DEFAULT_ROOT, Topics

CONFIG_FILE = "mosquitto.conf"
PASSWORD_FILE = "passwd"  # noqa: S105 - a file name, not a password
ACL_FILE = "acl"
DATA_DIR = "data"
DEFAULT_RUN_AS = "mosquitto"
# QoS 1 messages Mosquitto keeps per client while it is slow or away. The server's one
# subscription carries every device's events: a server seconds behind at peak must not
# lose them (at 1,000 it did, silently). A device's own queue holds a few commands.
MAX_QUEUED_MESSAGES = 100_000


@dataclass(frozen=True, slots=True)
class MosquittoOptions:
    """How the generated broker listens and which topics it guards."""

    host: str = "127.0.0.1"
    port: int = 1883
    topic_root: str = DEFAULT_ROOT
    # None: no `user` line, so Mosquitto started as root runs as `mosquitto`.
    run_as: str | None = None
    # Devices that read back their own retained `state` need this; the agent does not.
    device_reads_own_state: bool = False

    def __post_init__(self) -> None:
        Topics(self.topic_root)  # raises InvalidTopicError on a bad root
        if not 1 <= self.port <= 65535:
            raise ValueError(f"invalid port {self.port}")
        if not self.host or any(ch.isspace() for ch in self.host):
            raise ValueError(f"invalid listener host {self.host!r}")
        if self.run_as is not None and (not self.run_as or any(c.isspace() for c in self.run_as)):
            raise ValueError(f"invalid user {self.run_as!r}")


@dataclass(frozen=True, slots=True)
class MosquittoFiles:
    """Where `write_config` put everything."""

    directory: Path
    config: Path
    password_file: Path
    acl_file: Path
    data_dir: Path

    def command(self) -> list[str]:
        """Return the command line that starts Mosquitto with this configuration."""
        return ["mosquitto", "-c", str(self.config)]


def render_config(directory: Path, options: MosquittoOptions) -> str:
    """Return `mosquitto.conf` for files kept in `directory` (an absolute path)."""
    lines = [
        "# Written by roompay from its database; regenerate instead of editing.",
        "per_listener_settings false",
    ]
    if options.run_as is not None:
        lines.append(f"user {options.run_as}")
    lines += [
        f"listener {options.port} {options.host}",
        "allow_anonymous false",
        f"password_file {directory / PASSWORD_FILE}",
        f"acl_file {directory / ACL_FILE}",
        "use_username_as_clientid true",
        "set_tcp_nodelay true",
        f"max_queued_messages {MAX_QUEUED_MESSAGES:d}",
        "persistence true",
        f"persistence_location {directory / DATA_DIR}/",
    ]
    return "\n".join(lines) + "\n"


def render_password_file(backend: MqttAccount, devices: Sequence[MqttAccount]) -> str:
    """Return the password file: the backend first, then the devices by username."""
    accounts = [backend, *sorted(devices, key=lambda account: account.username)]
    seen: set[str] = set()
    for account in accounts:
        if account.username in seen:
            raise CredentialError(f"MQTT username {account.username!r} appears twice")
        seen.add(account.username)
    return "".join(f"{account.username}:{account.password_hash}\n" for account in accounts)


def render_acl(backend_username: str, options: MosquittoOptions) -> str:
    """Return the ACL file: the backend owns the root; `%u` patterns confine each device."""
    device = f"{options.topic_root}/dev/%u"
    lines = [
        "# Written by roompay from its database; regenerate instead of editing.",
        f"user {backend_username}",
        f"topic readwrite {options.topic_root}/#",
        "",
        "# Every other user is a device whose username is its code.",
        f"pattern read {device}/cmd/#",
        f"pattern write {device}/evt/#",
        f"pattern write {device}/state",
    ]
    if options.device_reads_own_state:
        lines.append(f"pattern read {device}/state")
    return "\n".join(lines) + "\n"


def write_config(
    directory: Path,
    backend: MqttAccount,
    devices: Sequence[MqttAccount],
    options: MosquittoOptions,
) -> MosquittoFiles:
    """Render every file first, then write them into `directory` (created if missing)."""
    directory = directory.resolve()
    password_text = render_password_file(backend, devices)
    acl_text = render_acl(backend.username, options)
    config_text = render_config(directory, options)
    owner = _owner(options.run_as)

    directory.mkdir(parents=True, exist_ok=True)
    files = MosquittoFiles(
        directory=directory,
        config=directory / CONFIG_FILE,
        password_file=directory / PASSWORD_FILE,
        acl_file=directory / ACL_FILE,
        data_dir=directory / DATA_DIR,
    )
    files.data_dir.mkdir(exist_ok=True)
    for path, text in (
        (files.password_file, password_text),
        (files.acl_file, acl_text),
        (files.config, config_text),
    ):
        _write_private(path, text)
    _hand_over(files, owner)
    return files


def _write_private(path: Path, text: str) -> None:
    # Write beside the target and rename, so a running broker never reads half a file.
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.chmod(temporary, 0o640)
    temporary.replace(path)


def _owner(run_as: str | None) -> tuple[int, int] | None:
    """Return (uid, gid) of the user Mosquitto will run as, if it exists here."""
    name = DEFAULT_RUN_AS if run_as is None else run_as
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _hand_over(files: MosquittoFiles, owner: tuple[int, int] | None) -> None:
    """Let the broker's user read the files and write `data/`, where we may chown."""
    # Group access only: the broker's group must enter both; others get nothing.
    os.chmod(files.directory, 0o750)  # noqa: S103
    os.chmod(files.data_dir, 0o750)  # noqa: S103
    if owner is None or os.geteuid() != 0:
        return
    uid, gid = owner
    for path in (files.directory, files.config, files.password_file, files.acl_file):
        os.chown(path, 0, gid)
    os.chown(files.data_dir, uid, gid)
