"""Inbound WeChat Pay notifies: verify, decrypt, parse.

The provider's processing order (§1.6): verify the signature with the platform key
selected by `Wechatpay-Serial`, check the timestamp skew, decrypt the resource with
the APIv3 key, then parse it. Any failure raises `NotificationRejectedError`, so
the caller answers with the failure reply and the provider sends it again.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from roompay.payments.errors import NotificationRejectedError
from roompay.payments.wechatpay import constants as c
from roompay.payments.wechatpay import wire


@dataclass(frozen=True, slots=True)
class DecryptedNotify:
    """A verified notify: its envelope and the decrypted resource's bytes."""

    envelope: wire.NotifyEnvelope
    plaintext: bytes


@dataclass(frozen=True, slots=True)
class TransactionNotify:
    """A verified payment notify (`original_type` "transaction")."""

    envelope: wire.NotifyEnvelope
    transaction: wire.Transaction


def open_notify(
    headers: Mapping[str, str],
    body: bytes,
    now: datetime,
    platform_keys: Mapping[str, rsa.RSAPublicKey],
    apiv3_key: str,
) -> DecryptedNotify:
    """Verify a notify of any kind and decrypt its resource."""
    try:
        wire.verify_platform_signature(wire.lower_keys(headers), body, platform_keys, now)
        envelope = wire.NotifyEnvelope.model_validate_json(body)
        resource = envelope.resource
        if envelope.resource_type != c.RESOURCE_TYPE_ENCRYPTED:
            raise wire.WireError(f"unexpected resource_type {envelope.resource_type!r}")
        if resource.algorithm != c.AEAD_ALGORITHM:
            raise wire.WireError(f"unexpected algorithm {resource.algorithm!r}")
        plaintext = wire.decrypt_resource(
            apiv3_key, resource.nonce, resource.associated_data, resource.ciphertext
        )
    except (ValueError, ValidationError) as exc:
        # WireError and pydantic's ValidationError are both ValueErrors; named for clarity.
        raise NotificationRejectedError(f"notify rejected: {exc}") from exc
    return DecryptedNotify(envelope=envelope, plaintext=plaintext)


def parse_transaction_notify(
    headers: Mapping[str, str],
    body: bytes,
    now: datetime,
    platform_keys: Mapping[str, rsa.RSAPublicKey],
    apiv3_key: str,
) -> TransactionNotify:
    """Verify, decrypt and parse a payment (`TRANSACTION.*`) notify."""
    opened = open_notify(headers, body, now, platform_keys, apiv3_key)
    original_type = opened.envelope.resource.original_type
    if original_type != c.ORIGINAL_TYPE_TRANSACTION:
        raise NotificationRejectedError(f"not a payment notify: {original_type!r}")
    try:
        transaction = wire.Transaction.model_validate_json(opened.plaintext)
    except ValidationError as exc:
        raise NotificationRejectedError(f"malformed transaction: {exc}") from exc
    return TransactionNotify(envelope=opened.envelope, transaction=transaction)
