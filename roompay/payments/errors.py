"""Errors raised by payment providers, translated once, in each provider package.

PaymentError
├── ProviderUnavailableError   network failure, timeout or 5xx: safe to retry the same request
├── ProviderRejectedError      the provider answered with a business or request error code
├── ProviderSignatureError     a response whose signature does not verify: never trusted
└── NotificationRejectedError  an inbound notify that failed verification or decoding
"""


class PaymentError(Exception):
    """Base class of every provider error that leaves a provider package."""


class ProviderUnavailableError(PaymentError):
    """The provider could not be reached or failed on its side; the call may be retried."""


class ProviderRejectedError(PaymentError):
    """The provider refused the request with its own error code."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class TradeAlreadyPaidError(ProviderRejectedError):
    """The trade cannot be closed: the guest has already paid it."""


class ProviderSignatureError(PaymentError):
    """A response from the provider carried a missing or invalid signature."""


class NotificationRejectedError(PaymentError):
    """An inbound notification is forged, malformed, stale or not addressed to us."""
