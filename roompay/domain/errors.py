"""Errors of the domain. Every failure the product can name has a type here.

DomainError
├── InvalidAmountError        an amount that is not whole positive fen
├── InvalidTransitionError    an order asked to move where its state machine forbids
└── NotFoundError             a device, program, hotel or order that does not exist
"""


class DomainError(Exception):
    """Base class of every error the domain raises."""


class InvalidAmountError(DomainError):
    """An amount is not a valid integer number of fen for its use."""


class InvalidTransitionError(DomainError):
    """An order was asked to move to a state its state machine does not allow."""


class NotFoundError(DomainError):
    """Something named by the caller does not exist."""
