"""Alipay's daily trade bill as the emulator serves it: a zip of two GBK CSVs.

`<app_id>_<yyyymmdd>_业务明细.csv` lists every payment (业务类型 交易) and refund
(退款, negative amounts, 退款批次号/请求号 = out_request_no) completed that Beijing
day, between `#` title lines, the 业务明细列表 markers and the `#交易合计`,
`#退款合计` and `#导出时间` lines; `…_业务明细(汇总).csv` holds the day's totals.
Cells are padded with a tab where Alipay pads them (long numbers, so that
spreadsheets keep their digits), and the zip stores GBK file names without the
UTF-8 flag, as Alipay's does.

服务费（元） is the merchant's cost as the bill shows it: the 0.6 % fee, rounded half
up to the fen, negative on a payment; on a refund the fee given back, positive,
computed as fee(refunded so far) − fee(refunded before) so that refunds never
give back more than the payment was charged and a full refund gives back all of it.
"""

import csv
import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from roompay.domain.money import Fen, yuan_str
from roompay.payments.alipay.client import beijing_timestamp
from roompay.payments.alipay.constants import (
    BEIJING,
    BILL_DETAIL_SUFFIX,
    BILL_ENCODING,
    BILL_SUMMARY_SUFFIX,
    BillBusinessType,
)

FEE_PER_MILLE = 6  # 0.6 %, the usual 当面付 rate
DETAIL_HEADER = (
    "支付宝交易号,商户订单号,业务类型,商品名称,创建时间,完成时间,门店编号,门店名称,操作员,"
    "终端号,对方账户,订单金额（元）,商家实收（元）,支付宝红包（元）,集分宝（元）,"
    "支付宝优惠（元）,商家优惠（元）,券核销金额（元）,券名称,商家红包消费金额（元）,"
    "卡消费金额（元）,退款批次号/请求号,服务费（元）,分润（元）,备注"
)
SUMMARY_HEADER = (
    "门店编号,门店名称,交易订单总笔数,退款订单总笔数,订单金额（元）,商家实收（元）,"
    "支付宝优惠（元）,商家优惠（元）,卡消费金额（元）,服务费（元）,分润（元）,实收净额（元）"
)
# The markers exactly as exported: the closing one is shorter, the text being longer.
DETAIL_BEGIN = "#" + "-" * 41 + "业务明细列表" + "-" * 40
DETAIL_END = "#" + "-" * 41 + "业务明细列表结束" + "-" * 36
SUMMARY_BEGIN = "#" + "-" * 41 + "业务汇总列表" + "-" * 40
SUMMARY_END = "#" + "-" * 41 + "业务汇总列表结束" + "-" * 36
_LINE_END = "\r\n"


def service_fee(amount_fen: Fen) -> Fen:
    """The 0.6 % fee on an amount, rounded half up to the fen (integers only)."""
    return (amount_fen * FEE_PER_MILLE + 500) // 1000


@dataclass(frozen=True, slots=True)
class BillLine:
    """One record of the detail file; amounts signed as the bill shows them."""

    trade_no: str
    out_trade_no: str
    business_type: BillBusinessType
    subject: str
    created_at: datetime
    finished_at: datetime
    buyer_logon_id: str
    amount_fen: Fen  # negative on a refund
    refund_request_no: str
    fee_fen: Fen  # the bill's 服务费: negative on a payment, positive on a refund
    remark: str = ""


def _chinese_time(moment: datetime) -> str:
    return moment.astimezone(BEIJING).strftime("%Y年%m月%d日 %H:%M:%S")


def _csv_row(cells: Sequence[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(cells)
    return out.getvalue()


def _titles(title: str, account: str, bill_date: date) -> list[str]:
    start = datetime(bill_date.year, bill_date.month, bill_date.day, tzinfo=BEIJING)
    end = start + timedelta(days=1)
    return [
        f"#{title}",
        f"#账号：[{account}]",
        f"#起始日期：[{_chinese_time(start)}]   终止日期：[{_chinese_time(end)}]",
    ]


def detail_text(
    account: str, bill_date: date, lines: Sequence[BillLine], exported_at: datetime
) -> str:
    """The detail file's text, in the layout Alipay exports."""
    payments = [line for line in lines if line.business_type is BillBusinessType.PAYMENT]
    refunds = [line for line in lines if line.business_type is BillBusinessType.REFUND]
    rows = [
        _csv_row(
            [
                line.trade_no + "\t",
                line.out_trade_no + "\t",
                str(line.business_type),
                line.subject,
                beijing_timestamp(line.created_at),
                beijing_timestamp(line.finished_at),
                "",
                "",
                "",
                "",
                line.buyer_logon_id,
                yuan_str(line.amount_fen),
                yuan_str(line.amount_fen),
                "0.00",
                "0.00",
                "0.00",
                "0.00",
                "0.00",
                "",
                "0.00",
                "0.00",
                line.refund_request_no + "\t" if line.refund_request_no else "",
                yuan_str(line.fee_fen),
                "0.00",
                line.remark,
            ]
        )
        for line in lines
    ]
    paid = sum(line.amount_fen for line in payments)
    refunded = sum(line.amount_fen for line in refunds)
    text = [
        *_titles("支付宝业务明细查询", account, bill_date),
        DETAIL_BEGIN,
        DETAIL_HEADER,
        *rows,
        DETAIL_END,
        f"#交易合计：{len(payments)}笔，商家实收共{yuan_str(paid)}元，商家优惠共0.00元",
        f"#退款合计：{len(refunds)}笔，商家实收退款共{yuan_str(refunded)}元，商家优惠退款共0.00元",
        f"#导出时间：[{_chinese_time(exported_at)}]",
    ]
    return _LINE_END.join(text) + _LINE_END


def summary_text(
    account: str, bill_date: date, lines: Sequence[BillLine], exported_at: datetime
) -> str:
    """The summary file's text: one line for the (single, unnamed) store and the total."""
    payments = sum(1 for line in lines if line.business_type is BillBusinessType.PAYMENT)
    refunds = len(lines) - payments
    amount = sum(line.amount_fen for line in lines)
    fee = sum(line.fee_fen for line in lines)
    figures = [
        str(payments),
        str(refunds),
        yuan_str(amount),
        yuan_str(amount),
        "0.00",
        "0.00",
        "0.00",
        yuan_str(fee),
        "0.00",
        yuan_str(amount + fee),
    ]
    text = [
        *_titles("支付宝业务汇总查询", account, bill_date),
        SUMMARY_BEGIN,
        SUMMARY_HEADER,
        _csv_row(["", "", *figures]),
        _csv_row(["合计", "", *figures]),
        SUMMARY_END,
        f"#导出时间：[{_chinese_time(exported_at)}]",
    ]
    return _LINE_END.join(text) + _LINE_END


class _GbkName(zipfile.ZipInfo):
    """A zip entry whose name is stored in GBK without the UTF-8 flag, as Alipay's are."""

    def _encodeFilenameFlags(self) -> tuple[bytes, int]:  # noqa: N802 - zipfile's own name
        return self.filename.encode(BILL_ENCODING), self.flag_bits


def bill_zip(
    app_id: str, account: str, bill_date: date, lines: Sequence[BillLine], exported_at: datetime
) -> bytes:
    """The downloadable bill: the detail and summary files, GBK-encoded, zipped."""
    stem = f"{app_id}_{bill_date.strftime('%Y%m%d')}_"
    files = {
        stem + BILL_DETAIL_SUFFIX: detail_text(account, bill_date, lines, exported_at),
        stem + BILL_SUMMARY_SUFFIX: summary_text(account, bill_date, lines, exported_at),
    }
    buffer = io.BytesIO()
    local = exported_at.astimezone(BEIJING)
    stamp = (local.year, local.month, local.day, local.hour, local.minute, local.second)
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, text in files.items():
            info = _GbkName(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            # A subject outside GBK (an emoji) shows as "?", as in Alipay's export.
            bundle.writestr(info, text.encode(BILL_ENCODING, errors="replace"))
    return buffer.getvalue()
