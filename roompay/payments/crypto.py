"""RSA-SHA256 (PKCS#1 v1.5) helpers shared by both providers and the sandbox.

Both WeChat Pay API v3 and Alipay RSA2 sign with RSASSA-PKCS1-v1_5 over SHA-256,
base64-encoded.
"""

import base64
import binascii

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def generate_private_key() -> rsa.RSAPrivateKey:
    """Make a new RSA-2048 key, as both providers issue."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_key_pem(key: rsa.RSAPrivateKey) -> str:
    """Serialize a private key as PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def public_key_pem(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> str:
    """Serialize the public half of a key as SubjectPublicKeyInfo PEM."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_private_key(pem: str | bytes) -> rsa.RSAPrivateKey:
    """Load an RSA private key from PEM."""
    data = pem.encode() if isinstance(pem, str) else pem
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    return key


def load_public_key(pem: str | bytes) -> rsa.RSAPublicKey:
    """Load an RSA public key from PEM."""
    data = pem.encode() if isinstance(pem, str) else pem
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    return key


def sign_b64(key: rsa.RSAPrivateKey, message: bytes) -> str:
    """Sign with SHA256withRSA and return base64."""
    signature = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(signature).decode()


def verify_b64(key: rsa.RSAPublicKey, message: bytes, signature_b64: str) -> bool:
    """Tell whether a base64 SHA256withRSA signature is valid for the message."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        return False
    try:
        key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True
