"""How much goes back to a guest when an appliance runs less than was paid for.

The policy (documented for hotels and guests): an appliance that ran less than
`full_refund_below_s` gives everything back; otherwise the unused share of the
price goes back, rounded up to the fen in the guest's favour.
"""

from dataclasses import dataclass

from roompay.domain.money import Fen


@dataclass(frozen=True, slots=True)
class RefundPolicy:
    """Pro-rated refunds for early stops."""

    full_refund_below_s: int = 60

    def unused_share(self, amount_fen: Fen, duration_s: int, actual_run_s: int) -> Fen:
        """The fen owed back for a run of `actual_run_s` out of `duration_s` paid seconds."""
        if amount_fen < 0 or duration_s <= 0 or actual_run_s < 0:
            raise ValueError(
                "amount, duration and run time must be non-negative, duration positive"
            )
        if actual_run_s >= duration_s:
            return 0
        if actual_run_s < self.full_refund_below_s:
            return amount_fen
        unused = duration_s - actual_run_s
        return -(-amount_fen * unused // duration_s)  # ceiling division: the guest's favour
