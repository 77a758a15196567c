"""Alipay's trade bill: the parser (a GBK zip read by header name) and the emulator's writer."""

import io
import zipfile
from datetime import UTC, date, datetime

import pytest

from roompay.payments.alipay.bill import parse_detail_csv, parse_trade_bill
from roompay.payments.alipay.constants import BillBusinessType
from roompay.payments.base import BillEntry, BillEntryKind
from roompay.payments.errors import ProviderRejectedError, ProviderUnavailableError
from roompay.sandbox.alipay_bill import BillLine, bill_zip, detail_text, service_fee

DETAIL_NAME = "2021000000000001_20260301_业务明细.csv"
SUMMARY_NAME = "2021000000000001_20260301_业务明细(汇总).csv"

# As Alipay exports it, but with an extra column (买家账号) between two known ones,
# tab-padded numbers and space-padded cells: only header names may be relied on.
DETAIL = (
    "#支付宝业务明细查询\r\n"
    "#账号：[20880000000000020156]\r\n"
    "#起始日期：[2026年03月01日 00:00:00]   终止日期：[2026年03月02日 00:00:00]\r\n"
    "#-----------------------------------------业务明细列表----------------------------------------\r\n"
    "支付宝交易号,商户订单号,业务类型,商品名称,创建时间,完成时间,门店编号,门店名称,操作员,"
    "终端号,对方账户,买家账号,订单金额（元）,商家实收（元）,支付宝红包（元）,集分宝（元）,"
    "支付宝优惠（元）,商家优惠（元）,券核销金额（元）,券名称,商家红包消费金额（元）,"
    "卡消费金额（元）,退款批次号/请求号,服务费（元）,分润（元）,备注\r\n"
    "2026030122001400000000000001\t,order-0001\t,交易,干衣机 30 分钟,2026-03-01 20:30:10,"
    "2026-03-01 20:30:30,,,,,gue***@example.com,x,8.00,8.00,0.00,0.00,0.00,0.00,0.00,,"
    "0.00,0.00,,-0.05,0.00,\r\n"
    "2026030122001400000000000001\t,order-0001\t,退款,干衣机 30 分钟,2026-03-01 20:30:10,"
    "2026-03-01 20:45:00,,,,,gue***@example.com,x, -3.00 , -3.00 ,0.00,0.00,0.00,0.00,"
    "0.00,,0.00,0.00,r-0001\t, 0.02 ,0.00,cut short\r\n"
    "#-----------------------------------------业务明细列表结束------------------------------------\r\n"
    "#交易合计：1笔，商家实收共8.00元，商家优惠共0.00元\r\n"
    "#退款合计：1笔，商家实收退款共-3.00元，商家优惠退款共0.00元\r\n"
    "#导出时间：[2026年03月02日 09:00:00]\r\n"
)
EXPECTED = [
    BillEntry(
        kind=BillEntryKind.PAYMENT,
        out_trade_no="order-0001",
        provider_trade_no="2026030122001400000000000001",
        refund_key=None,
        amount_fen=800,
        fee_fen=5,
        at=datetime(2026, 3, 1, 12, 30, 30, tzinfo=UTC),
    ),
    BillEntry(
        kind=BillEntryKind.REFUND,
        out_trade_no="order-0001",
        provider_trade_no="2026030122001400000000000001",
        refund_key="r-0001",
        amount_fen=300,
        fee_fen=-2,
        at=datetime(2026, 3, 1, 12, 45, tzinfo=UTC),
    ),
]


class GbkName(zipfile.ZipInfo):
    """Store the entry's name in GBK without the UTF-8 flag, as Alipay's zips do."""

    def _encodeFilenameFlags(self) -> tuple[bytes, int]:  # noqa: N802 - zipfile's name
        return self.filename.encode("gbk"), self.flag_bits


def gbk_zip(files: dict[str, str], gbk_names: bool = True) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, text in files.items():
            info = GbkName(name) if gbk_names else zipfile.ZipInfo(name)
            bundle.writestr(info, text.encode("gbk"))
    return buffer.getvalue()


# --- the parser ---------------------------------------------------------------------


@pytest.mark.parametrize("gbk_names", [True, False], ids=["gbk-names", "utf8-flagged-names"])
def test_bill_zip_is_read_from_the_detail_file_by_header_name(gbk_names: bool) -> None:
    archive = gbk_zip({SUMMARY_NAME: "#汇总\r\n", DETAIL_NAME: DETAIL}, gbk_names)

    assert parse_trade_bill(archive) == EXPECTED


def test_half_width_parentheses_positive_fees_and_blank_refund_key_are_read() -> None:
    text = (
        "#支付宝业务明细查询\n"
        "业务类型,完成时间,商户订单号,支付宝交易号,订单金额(元),服务费(元),退款批次号/请求号\n"
        "交易,2026-03-01 08:00:00,o-1,t-1,1.00,0.01,\n"
        "退款,2026-03-01 09:00:00,o-1,t-1,-1.00,-0.01,\n"
        "转账,2026-03-01 10:00:00,o-2,t-2,5.00,,\n"
    )

    entries = parse_detail_csv(text)

    assert [(e.kind, e.amount_fen, e.fee_fen, e.refund_key) for e in entries] == [
        (BillEntryKind.PAYMENT, 100, 1, None),
        (BillEntryKind.REFUND, 100, -1, None),
    ]
    assert entries[0].at == datetime(2026, 3, 1, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("files", "error", "message"),
    [
        ({SUMMARY_NAME: "#汇总\r\n"}, ProviderRejectedError, "expected one"),
        ({DETAIL_NAME: "#only comments\r\n"}, ProviderRejectedError, "no header row"),
        (
            {DETAIL_NAME: "支付宝交易号,商户订单号,业务类型\r\n"},
            ProviderRejectedError,
            "lacks 完成时间, 订单金额（元）, 退款批次号/请求号, 服务费（元）",
        ),
        (
            {DETAIL_NAME: DETAIL.replace("8.00,8.00", "8.001,8.00")},
            ProviderRejectedError,
            "订单金额（元） '8.001' is not a yuan amount",
        ),
        (
            {DETAIL_NAME: DETAIL.replace("2026-03-01 20:30:30", "01/03/2026")},
            ProviderRejectedError,
            "完成时间 '01/03/2026'",
        ),
    ],
)
def test_malformed_bills_are_refused(
    files: dict[str, str], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as caught:
        parse_trade_bill(gbk_zip(files))

    assert isinstance(caught.value, ProviderRejectedError)
    assert caught.value.code == "malformed-bill"


def test_a_truncated_download_is_retryable() -> None:
    archive = gbk_zip({DETAIL_NAME: DETAIL})

    with pytest.raises(ProviderUnavailableError, match="not a readable zip"):
        parse_trade_bill(archive[: len(archive) // 2])


def test_a_short_row_is_refused() -> None:
    text = (
        "支付宝交易号,商户订单号,业务类型,完成时间,订单金额（元）,退款批次号/请求号,服务费（元）\n"
        "t,o,交易\n"
    )

    with pytest.raises(ProviderRejectedError, match="line 2 has 3 cells, the header 7"):
        parse_detail_csv(text)


# --- the emulator's writer -------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "fee"), [(800, 5), (300, 2), (83, 0), (84, 1), (250, 2), (1, 0), (10_000, 60)]
)
def test_service_fee_is_six_per_mille_rounded_half_up(amount: int, fee: int) -> None:
    assert service_fee(amount) == fee


LINES = [
    BillLine(
        trade_no="2026030122001400000000000001",
        out_trade_no="order-0001",
        business_type=BillBusinessType.PAYMENT,
        subject="干衣机 30 分钟",
        created_at=datetime(2026, 3, 1, 12, 30, 10, tzinfo=UTC),
        finished_at=datetime(2026, 3, 1, 12, 30, 30, tzinfo=UTC),
        buyer_logon_id="gue***@example.com",
        amount_fen=800,
        refund_request_no="",
        fee_fen=-5,
    ),
    BillLine(
        trade_no="2026030122001400000000000001",
        out_trade_no="order-0001",
        business_type=BillBusinessType.REFUND,
        subject="干衣机 30 分钟",
        created_at=datetime(2026, 3, 1, 12, 30, 10, tzinfo=UTC),
        finished_at=datetime(2026, 3, 1, 12, 45, tzinfo=UTC),
        buyer_logon_id="gue***@example.com",
        amount_fen=-300,
        refund_request_no="r-0001",
        fee_fen=2,
        remark="cut short",
    ),
]
EXPORTED = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)


def test_the_detail_file_has_alipays_layout() -> None:
    text = detail_text("2088000000000002", date(2026, 3, 1), LINES, EXPORTED)

    assert text.split("\r\n") == [
        "#支付宝业务明细查询",
        "#账号：[2088000000000002]",
        "#起始日期：[2026年03月01日 00:00:00]   终止日期：[2026年03月02日 00:00:00]",
        "#-----------------------------------------业务明细列表----------------------------------------",
        "支付宝交易号,商户订单号,业务类型,商品名称,创建时间,完成时间,门店编号,门店名称,操作员,"
        "终端号,对方账户,订单金额（元）,商家实收（元）,支付宝红包（元）,集分宝（元）,"
        "支付宝优惠（元）,商家优惠（元）,券核销金额（元）,券名称,商家红包消费金额（元）,"
        "卡消费金额（元）,退款批次号/请求号,服务费（元）,分润（元）,备注",
        "2026030122001400000000000001\t,order-0001\t,交易,干衣机 30 分钟,2026-03-01 20:30:10,"
        "2026-03-01 20:30:30,,,,,gue***@example.com,8.00,8.00,0.00,0.00,0.00,0.00,0.00,,"
        "0.00,0.00,,-0.05,0.00,",
        "2026030122001400000000000001\t,order-0001\t,退款,干衣机 30 分钟,2026-03-01 20:30:10,"
        "2026-03-01 20:45:00,,,,,gue***@example.com,-3.00,-3.00,0.00,0.00,0.00,0.00,0.00,,"
        "0.00,0.00,r-0001\t,0.02,0.00,cut short",
        "#-----------------------------------------业务明细列表结束------------------------------------",
        "#交易合计：1笔，商家实收共8.00元，商家优惠共0.00元",
        "#退款合计：1笔，商家实收退款共-3.00元，商家优惠退款共0.00元",
        "#导出时间：[2026年03月02日 09:00:00]",
        "",
    ]


def test_the_emulators_zip_has_gbk_names_and_parses_back() -> None:
    archive = bill_zip("2021000000000001", "2088000000000002", date(2026, 3, 1), LINES, EXPORTED)

    with zipfile.ZipFile(io.BytesIO(archive)) as bundle:
        infos = bundle.infolist()
        raw_names = [info.filename.encode("cp437") for info in infos]
        flags = [info.flag_bits & 0x800 for info in infos]
        summary = bundle.read(infos[1]).decode("gbk")

    assert raw_names == [DETAIL_NAME.encode("gbk"), SUMMARY_NAME.encode("gbk")]
    assert flags == [0, 0]
    assert summary.split("\r\n")[4:7] == [
        "门店编号,门店名称,交易订单总笔数,退款订单总笔数,订单金额（元）,商家实收（元）,"
        "支付宝优惠（元）,商家优惠（元）,卡消费金额（元）,服务费（元）,分润（元）,实收净额（元）",
        ",,1,1,5.00,5.00,0.00,0.00,0.00,-0.03,0.00,4.97",
        "合计,,1,1,5.00,5.00,0.00,0.00,0.00,-0.03,0.00,4.97",
    ]
    assert parse_trade_bill(archive) == EXPECTED
