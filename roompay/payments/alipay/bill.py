"""Parse Alipay's daily trade bill: a zip of GBK-encoded CSVs.

The archive holds `<id>_<yyyymmdd>_业务明细.csv` (one line per payment and refund)
and `<id>_<yyyymmdd>_业务明细(汇总).csv` (totals); only the detail is read. Its
lines starting with `#` are titles, markers and totals; the first other line is the
header row, and every later one a record. Columns are found by header name, never
by position, and cells are stripped of the tab and space padding Alipay adds.

Fees: the bill's 服务费（元） is the merchant's cash flow (negative when charged on
a payment, positive when given back on a refund). `BillEntry.fee_fen` is the
provider's fee instead, so a payment's fee is its absolute value and a refund's
the negative of its absolute value, whichever sign convention the file uses.
"""

import csv
import io
import logging
import zipfile
from datetime import UTC

from roompay.domain.errors import InvalidAmountError
from roompay.domain.money import Fen, parse_yuan
from roompay.payments.alipay.client import parse_beijing_timestamp
from roompay.payments.alipay.constants import (
    BILL_COMMENT_PREFIX,
    BILL_DETAIL_SUFFIX,
    BILL_ENCODING,
    BillBusinessType,
    BillColumn,
)
from roompay.payments.base import BillEntry, BillEntryKind
from roompay.payments.errors import ProviderRejectedError, ProviderUnavailableError

log = logging.getLogger(__name__)

# A day of a hotel's appliance sales is kilobytes; far more is not a bill.
MAX_BILL_FILE_BYTES = 64 * 1024 * 1024
# GB18030 decodes every GBK byte sequence and a few more characters besides.
_DECODE_AS = "gb18030"
_KINDS: dict[str, BillEntryKind] = {
    BillBusinessType.PAYMENT: BillEntryKind.PAYMENT,
    BillBusinessType.REFUND: BillEntryKind.REFUND,
}


def _malformed(message: str) -> ProviderRejectedError:
    return ProviderRejectedError(code="malformed-bill", message=message)


def detail_csv(archive: bytes) -> str:
    """Open the bill's zip and return its detail file (`…业务明细.csv`) as text."""
    try:
        # Alipay stores the file names in GBK without the zip UTF-8 flag.
        with zipfile.ZipFile(io.BytesIO(archive), metadata_encoding=BILL_ENCODING) as bundle:
            details = [i for i in bundle.infolist() if i.filename.endswith(BILL_DETAIL_SUFFIX)]
            if len(details) != 1:
                names = [info.filename for info in bundle.infolist()]
                raise _malformed(f"expected one …{BILL_DETAIL_SUFFIX} in the bill, got {names}")
            (detail,) = details
            if detail.file_size > MAX_BILL_FILE_BYTES:
                raise _malformed(f"{detail.filename} is {detail.file_size} bytes")
            raw = bundle.read(detail)
    except (zipfile.BadZipFile, EOFError) as exc:
        # A truncated download: fetching the bill again (with a fresh URL) may work.
        raise ProviderUnavailableError(f"the bill download is not a readable zip: {exc}") from exc
    try:
        return raw.decode(_DECODE_AS)
    except UnicodeDecodeError as exc:
        raise _malformed(f"{detail.filename} is not GBK text: {exc}") from exc


def _normalize_header(cell: str) -> str:
    # The header spells its parentheses full-width; accept half-width ones as the same name.
    return cell.strip().replace("(", "（").replace(")", "）")


def _fen(cell: str, column: str, line: int) -> Fen:
    if not cell:
        return 0
    try:
        return parse_yuan(cell)
    except InvalidAmountError as exc:
        raise _malformed(f"line {line}: {column} {cell!r} is not a yuan amount") from exc


def parse_detail_csv(text: str) -> list[BillEntry]:
    """Read the detail file's payment and refund records, by header name."""
    numbered = [
        (number, line)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith(BILL_COMMENT_PREFIX)
    ]
    if not numbered:
        raise _malformed("the detail file has no header row")
    header = [_normalize_header(cell) for cell in _cells(numbered[0][1])]
    missing = [column for column in BillColumn if column not in header]
    if missing:
        raise _malformed(f"the detail header lacks {', '.join(missing)}")
    position = {column: header.index(column) for column in BillColumn}
    entries: list[BillEntry] = []
    for number, line in numbered[1:]:
        cells = [cell.strip() for cell in _cells(line)]
        if len(cells) < len(header):
            raise _malformed(f"line {number} has {len(cells)} cells, the header {len(header)}")
        entry = _entry({column: cells[index] for column, index in position.items()}, number)
        if entry is not None:
            entries.append(entry)
    return entries


def _cells(line: str) -> list[str]:
    # One record per line: bill cells never hold line breaks.
    return next(csv.reader([line]))


def _entry(cells: dict[BillColumn, str], line: int) -> BillEntry | None:
    business_type = cells[BillColumn.BUSINESS_TYPE]
    kind = _KINDS.get(business_type)
    if kind is None:
        log.warning("skipping bill line %d of business type %r", line, business_type)
        return None
    try:
        at = parse_beijing_timestamp(cells[BillColumn.FINISHED_AT]).astimezone(UTC)
    except ValueError as exc:
        raise _malformed(f"line {line}: 完成时间 {cells[BillColumn.FINISHED_AT]!r}") from exc
    amount = abs(_fen(cells[BillColumn.ORDER_AMOUNT], BillColumn.ORDER_AMOUNT, line))
    fee = abs(_fen(cells[BillColumn.SERVICE_FEE], BillColumn.SERVICE_FEE, line))
    refund = kind is BillEntryKind.REFUND
    return BillEntry(
        kind=kind,
        out_trade_no=cells[BillColumn.OUT_TRADE_NO],
        provider_trade_no=cells[BillColumn.TRADE_NO],
        refund_key=(cells[BillColumn.REFUND_REQUEST_NO] or None) if refund else None,
        amount_fen=amount,
        fee_fen=-fee if refund else fee,
        at=at,
    )


def parse_trade_bill(archive: bytes) -> list[BillEntry]:
    """Parse a downloaded trade bill (the zip) into payment and refund entries."""
    return parse_detail_csv(detail_csv(archive))
