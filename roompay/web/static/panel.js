// The appliance's screen: choose, pay, watch it run. No third-party code.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("panel-data").textContent);
  const t = data.t;
  const $ = (id) => document.getElementById(id);
  let program = data.preselect_program || null;
  let order = null;
  let poll = null;

  const show = (id) => {
    for (const s of ["choose", "pay", "progress", "unavailable"]) $(s).classList.toggle("hidden", s !== id);
  };
  const yuan = (fen) => "¥" + Math.floor(fen / 100) + "." + String(fen % 100).padStart(2, "0");
  const mmss = (s) => {
    s = Math.max(0, Math.round(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    return (h ? h + ":" + String(m).padStart(2, "0") : m) + ":" + String(r).padStart(2, "0");
  };
  const newKey = () => Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");

  document.querySelectorAll("[data-program]").forEach((b) => {
    b.addEventListener("click", () => {
      program = b.dataset.program;
      document.querySelectorAll("[data-program]").forEach((o) => o.setAttribute("aria-pressed", String(o === b)));
      document.querySelectorAll("[data-wallet]").forEach((w) => (w.disabled = false));
    });
  });
  if (program) {
    document.querySelectorAll("[data-wallet]").forEach((w) => (w.disabled = false));
  }
  document.querySelectorAll("[data-wallet]").forEach((b) => b.addEventListener("click", () => checkout(b.dataset.wallet)));

  async function checkout(wallet) {
    const res = await fetch("/api/v1/checkout", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": newKey() },
      body: JSON.stringify({ device: data.device, program: program, wallet: wallet }),
    });
    const body = await res.json();
    if (!res.ok) {
      $("status-text").textContent = body.error ? body.error.message : t.failed;
      $("again").classList.remove("hidden");
      show("progress");
      return;
    }
    order = body;
    $("qr").src = "/api/v1/orders/" + order.order_id + "/qr.svg";
    $("amount").textContent = yuan(order.amount_fen);
    $("pay-title").textContent = wallet === "wechat" ? t.scan_wechat : t.scan_alipay;
    show("pay");
    startPolling();
  }

  function startPolling() {
    clearInterval(poll);
    poll = setInterval(refresh, 1000);
    refresh();
  }

  async function refresh() {
    if (!order) return;
    const res = await fetch("/api/v1/orders/" + order.order_id);
    if (!res.ok) return;
    const o = await res.json();
    render(o);
  }

  function render(o) {
    const now = Date.now();
    $("order-ref").textContent = t.order + " " + o.order_id.slice(0, 8);
    document.body.dataset.status = o.status;
    if (o.status === "awaiting_payment") {
      $("qr-countdown").textContent = mmss((Date.parse(o.expires_at) - now) / 1000);
      return;
    }
    show("progress");
    const left = o.started_at ? (Date.parse(o.started_at) + o.duration_s * 1000 - now) / 1000 : o.duration_s;
    const texts = {
      paid: t.starting, running: t.running, completed: t.done, expired: t.expired,
      refunded: t.refunded, partially_refunded: t.partially_refunded,
    };
    $("status-text").textContent = texts[o.status] || o.status;
    $("run-countdown").textContent = o.status === "running" ? mmss(left) : "";
    const over = ["completed", "expired", "refunded", "partially_refunded"].includes(o.status);
    $("again").classList.toggle("hidden", !over);
    if (over) clearInterval(poll);
  }

  $("cancel").addEventListener("click", () => { clearInterval(poll); order = null; show("choose"); });
  $("again").addEventListener("click", () => { location.reload(); });
  const sandboxPay = $("sandbox-pay");
  if (sandboxPay) {
    sandboxPay.addEventListener("click", async () => {
      if (!order) return;
      await fetch("/sandbox/pay", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ qr: order.qr }) });
    });
  }
})();
