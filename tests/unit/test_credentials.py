"""Password hashes in Mosquitto's format, and the broker files rendered from accounts."""

import base64
import stat
from pathlib import Path

import pytest

from roompay.iot.credentials import (
    CredentialError,
    MqttAccount,
    check_username,
    generate_password,
    hash_password,
    parse_password_hash,
    verify_password,
)
from roompay.iot.mosquitto import (
    MosquittoOptions,
    render_acl,
    render_config,
    render_password_file,
    write_config,
)
from roompay.protocol.errors import InvalidTopicError

# Written by `mosquitto_passwd -c -b passwd dev1 secret` (Mosquitto 2.0.11).
MOSQUITTO_PASSWD_LINE = (
    "dev1:$7$101$SdBNqFGgmjguEHSf$GIXj+6h6O1rXPyi+o09omHA1+5H5YXf0OpeVSSUIYO6jCZ9wP9K43T"
    "mEsGxIogFD2LZwUuNJpjswbRJwKw0TXQ=="
)
SALT = base64.b64decode("SdBNqFGgmjguEHSf")
HASH_A = hash_password("password-a", salt=bytes(12))
HASH_B = hash_password("password-b", salt=bytes(range(12)))
HASH_BACKEND = hash_password("password-backend", salt=b"\xff" * 12)


def test_given_the_tools_salt_when_hashing_then_the_line_is_what_mosquitto_passwd_wrote() -> None:
    assert f"dev1:{hash_password('secret', salt=SALT)}" == MOSQUITTO_PASSWD_LINE


def test_a_hash_is_scheme_7_with_101_iterations_a_12_byte_salt_and_a_64_byte_digest() -> None:
    iterations, salt, digest = parse_password_hash(hash_password("anything"))
    assert (iterations, len(salt), len(digest)) == (101, 12, 64)


def test_two_hashes_of_one_password_differ_by_their_random_salt() -> None:
    assert hash_password("same") != hash_password("same")


def test_verify_accepts_the_right_password_and_refuses_a_wrong_one() -> None:
    stored = MOSQUITTO_PASSWD_LINE.split(":", 1)[1]
    assert verify_password("secret", stored) is True
    assert verify_password("Secret", stored) is False
    assert verify_password("", stored) is False


@pytest.mark.parametrize(
    "bad",
    [
        "secret",
        "$6$rounds=5000$salt$hash",
        "$7$101$SdBNqFGgmjguEHSf$short",
        "$7$0$SdBNqFGgmjguEHSf$" + "A" * 88,
        "$7$101$!!!!$" + "A" * 88,
    ],
)
def test_a_malformed_hash_never_verifies_and_cannot_be_an_account(bad: str) -> None:
    assert verify_password("secret", bad) is False
    with pytest.raises(CredentialError):
        MqttAccount("dev1", bad)


def test_generated_passwords_are_24_url_safe_characters_and_unique() -> None:
    passwords = {generate_password() for _ in range(100)}
    assert len(passwords) == 100
    assert {len(p) for p in passwords} == {24}
    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert set("".join(passwords)) <= alphabet


@pytest.mark.parametrize("bad", ["", "a:b", "a/b", "a+b", "a#b", "x" * 65, "dév"])
def test_usernames_outside_the_device_code_alphabet_are_refused(bad: str) -> None:
    with pytest.raises(CredentialError):
        check_username(bad)


def test_hashing_refuses_an_empty_password_and_a_short_salt() -> None:
    with pytest.raises(CredentialError):
        hash_password("")
    with pytest.raises(CredentialError):
        hash_password("x", salt=b"short")


def test_config_text_for_production_has_no_user_line() -> None:
    text = render_config(Path("/etc/roompay-mqtt"), MosquittoOptions("0.0.0.0", 8883))  # noqa: S104
    assert text == (
        "# Written by roompay from its database; regenerate instead of editing.\n"
        "per_listener_settings false\n"
        "listener 8883 0.0.0.0\n"
        "allow_anonymous false\n"
        "password_file /etc/roompay-mqtt/passwd\n"
        "acl_file /etc/roompay-mqtt/acl\n"
        "use_username_as_clientid true\n"
        "set_tcp_nodelay true\n"
        "max_queued_messages 100000\n"
        "persistence true\n"
        "persistence_location /etc/roompay-mqtt/data/\n"
    )


def test_config_text_names_the_user_to_run_as_when_asked() -> None:
    text = render_config(Path("/srv/m"), MosquittoOptions(run_as="root"))
    assert text.splitlines()[1:4] == [
        "per_listener_settings false",
        "user root",
        "listener 1883 127.0.0.1",
    ]


def test_acl_text_gives_the_backend_the_root_and_each_device_its_own_topics() -> None:
    assert render_acl("backend", MosquittoOptions(topic_root="hp/v1")) == (
        "# Written by roompay from its database; regenerate instead of editing.\n"
        "user backend\n"
        "topic readwrite hp/v1/#\n"
        "\n"
        "# Every other user is a device whose username is its code.\n"
        "pattern read hp/v1/dev/%u/cmd/#\n"
        "pattern write hp/v1/dev/%u/evt/#\n"
        "pattern write hp/v1/dev/%u/state\n"
    )


def test_acl_text_lets_devices_read_their_own_state_only_when_asked() -> None:
    text = render_acl("backend", MosquittoOptions(device_reads_own_state=True))
    assert text.endswith(
        "pattern write roompay/v1/dev/%u/state\npattern read roompay/v1/dev/%u/state\n"
    )


def test_password_file_lists_the_backend_first_then_devices_by_name() -> None:
    text = render_password_file(
        MqttAccount("backend", HASH_BACKEND),
        [MqttAccount("DRY-0002", HASH_B), MqttAccount("AIR-0001", HASH_A)],
    )
    assert text == f"backend:{HASH_BACKEND}\nAIR-0001:{HASH_A}\nDRY-0002:{HASH_B}\n"


def test_password_file_refuses_a_device_named_like_the_backend() -> None:
    with pytest.raises(CredentialError, match="appears twice"):
        render_password_file(MqttAccount("backend", HASH_BACKEND), [MqttAccount("backend", HASH_A)])


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"topic_root": "bad/#"}, InvalidTopicError),
        ({"port": 0}, ValueError),
        ({"host": "a b"}, ValueError),
        ({"run_as": "two words"}, ValueError),
    ],
)
def test_bad_options_are_refused(options: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        MosquittoOptions(**options)  # type: ignore[arg-type]


def test_write_config_writes_three_private_files_and_a_data_directory(tmp_path: Path) -> None:
    files = write_config(
        tmp_path / "mqtt",
        MqttAccount("backend", HASH_BACKEND),
        [MqttAccount("AIR-0001", HASH_A)],
        MosquittoOptions(port=18999),
    )
    assert sorted(p.name for p in files.directory.iterdir()) == [
        "acl",
        "data",
        "mosquitto.conf",
        "passwd",
    ]
    assert files.password_file.read_text() == f"backend:{HASH_BACKEND}\nAIR-0001:{HASH_A}\n"
    for path in (files.config, files.password_file, files.acl_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert files.command() == ["mosquitto", "-c", str(tmp_path / "mqtt" / "mosquitto.conf")]


def test_write_config_writes_nothing_when_an_account_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CredentialError):
        write_config(
            tmp_path / "mqtt",
            MqttAccount("backend", HASH_BACKEND),
            [MqttAccount("backend", HASH_A)],
            MosquittoOptions(),
        )
    assert not (tmp_path / "mqtt").exists()
