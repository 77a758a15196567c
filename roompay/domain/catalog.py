"""The appliances of the patent and what a guest can buy on them."""

from dataclasses import dataclass
from enum import StrEnum

from roompay.domain.money import Fen, check_order_amount


class ApplianceKind(StrEnum):
    """The four appliance kinds of CN105913570A."""

    CLOTHES_DRYER = "clothes_dryer"
    AIR_PURIFIER = "air_purifier"
    WATER_PURIFIER = "water_purifier"
    AROMA_DIFFUSER = "aroma_diffuser"


APPLIANCE_NAMES: dict[ApplianceKind, tuple[str, str]] = {
    ApplianceKind.CLOTHES_DRYER: ("Clothes dryer", "干衣机"),
    ApplianceKind.AIR_PURIFIER: ("Air purifier", "空气净化器"),
    ApplianceKind.WATER_PURIFIER: ("Water purifier", "净水器"),
    ApplianceKind.AROMA_DIFFUSER: ("Aroma diffuser", "香薰机"),
}


class Wallet(StrEnum):
    """The wallets a guest can pay with."""

    WECHAT = "wechat"
    ALIPAY = "alipay"


@dataclass(frozen=True, slots=True)
class Program:
    """One thing a guest can buy on an appliance: a run of a fixed length at a price."""

    code: str
    kind: ApplianceKind
    name: str
    duration_s: int
    amount_fen: Fen

    def __post_init__(self) -> None:
        check_order_amount(self.amount_fen)
        if self.duration_s <= 0:
            raise ValueError(f"program {self.code}: duration must be positive")


def default_programs() -> list[Program]:
    """The programs a new hotel starts with; each hotel can change its prices."""
    k = ApplianceKind
    return [
        Program("dry30", k.CLOTHES_DRYER, "Dry 30 min", 30 * 60, 800),
        Program("dry60", k.CLOTHES_DRYER, "Dry 60 min", 60 * 60, 1500),
        Program("air8h", k.AIR_PURIFIER, "Purify 8 h", 8 * 3600, 1000),
        Program("airnight", k.AIR_PURIFIER, "Purify overnight (12 h)", 12 * 3600, 1500),
        Program("water1", k.WATER_PURIFIER, "1 L purified water", 2 * 60, 200),
        Program("water5", k.WATER_PURIFIER, "5 L purified water", 10 * 60, 800),
        Program("aroma1h", k.AROMA_DIFFUSER, "Aroma 1 h", 3600, 500),
        Program("aroma3h", k.AROMA_DIFFUSER, "Aroma 3 h", 3 * 3600, 1200),
    ]
