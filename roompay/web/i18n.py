"""Words of the guest and staff pages in Simplified Chinese and English."""

from typing import Final

TEXTS: Final[dict[str, dict[str, str]]] = {
    "zh-CN": {
        "appliance": "设备",
        "room": "房间",
        "minutes": "分钟",
        "pick_program": "请选择模式",
        "pick_wallet": "请选择支付方式",
        "wechat": "微信支付",
        "alipay": "支付宝",
        "scan": "请扫码支付",
        "scan_wechat": "请用微信扫码支付",
        "scan_alipay": "请用支付宝扫码支付",
        "expires_in": "二维码有效期",
        "sandbox_pay": "模拟顾客付款（沙箱）",
        "back": "返回",
        "starting": "支付成功，正在启动…",
        "running": "运行中",
        "done": "已完成，谢谢使用",
        "expired": "二维码已过期，未扣款",
        "refunded": "已全额退款",
        "partially_refunded": "已部分退款",
        "failed": "出错了，请重试",
        "again": "再来一次",
        "order": "订单",
        "offline": "设备离线，暂不可用，请联系前台",
        "busy": "设备正在运行中",
        "fault": "设备故障，请联系前台",
        "dashboard": "运营面板",
        "devices": "设备",
        "orders": "最近订单",
        "login": "登录",
        "username": "用户名",
        "password": "密码",
        "status": "状态",
        "amount": "金额",
    },
    "en": {
        "appliance": "Appliance",
        "room": "Room",
        "minutes": "min",
        "pick_program": "Choose a program",
        "pick_wallet": "Choose how to pay",
        "wechat": "WeChat Pay",
        "alipay": "Alipay",
        "scan": "Scan to pay",
        "scan_wechat": "Scan with WeChat to pay",
        "scan_alipay": "Scan with Alipay to pay",
        "expires_in": "QR valid for",
        "sandbox_pay": "Simulate the guest paying (sandbox)",
        "back": "Back",
        "starting": "Paid, starting…",
        "running": "Running",
        "done": "Done, thank you",
        "expired": "QR code expired; you were not charged",
        "refunded": "Refunded in full",
        "partially_refunded": "Partly refunded",
        "failed": "Something went wrong, please retry",
        "again": "Start again",
        "order": "Order",
        "offline": "This appliance is offline; please contact the front desk",
        "busy": "This appliance is running",
        "fault": "This appliance reports a fault; please contact the front desk",
        "dashboard": "Dashboard",
        "devices": "Devices",
        "orders": "Recent orders",
        "login": "Sign in",
        "username": "Username",
        "password": "Password",
        "status": "Status",
        "amount": "Amount",
    },
}


def pick_language(query_lang: str | None, accept_language: str | None) -> str:
    """Choose zh-CN or en from ?lang= first, then the Accept-Language header."""
    if query_lang in TEXTS:
        return query_lang
    if accept_language and accept_language.lower().startswith("en"):
        return "en"
    return "zh-CN"
