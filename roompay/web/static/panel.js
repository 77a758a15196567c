// The appliance's screen: choose, pay, watch it run. No third-party code.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("panel-data").textContent);
  const t = data.t;
  const $ = (id) => document.getElementById(id);
  let program = data.preselect_program || null;
  let order = null;
  let poll = null;
  let tick = null;
  let waitDevice = null;
  let last = null;

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
  const refusals = { device_offline: t.offline, device_busy: t.busy, device_faulted: t.fault };

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

  // An appliance that is offline, busy or faulted: watch it until it can take an order.
  function unavailable(state) {
    const box = $("unavailable");
    box.textContent = state === "offline" ? t.offline : state === "running" ? t.busy : t.fault;
    box.className = "card status state-" + state;
    document.body.dataset.status = "unavailable";
    show("unavailable");
    clearInterval(waitDevice);
    waitDevice = setInterval(async () => {
      const res = await fetch("/panel/" + encodeURIComponent(data.device) + "/state.json");
      if (!res.ok) return;
      const d = await res.json();
      if (d.online && d.state === "idle") {
        clearInterval(waitDevice);
        document.body.dataset.status = "";
        show("choose");
      }
    }, 3000);
  }
  if (!data.online) unavailable("offline");
  else if (data.state !== "idle") unavailable(data.state);

  async function checkout(wallet) {
    const res = await fetch("/api/v1/checkout", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": newKey() },
      body: JSON.stringify({ device: data.device, program: program, wallet: wallet }),
    });
    const body = await res.json();
    if (!res.ok) {
      const code = body.error ? body.error.code : "";
      if (code === "device_offline") return unavailable("offline");
      if (code === "device_busy") return unavailable("running");
      if (code === "device_faulted") return unavailable("fault");
      $("status-text").textContent = refusals[code] || (body.error ? body.error.message : t.failed);
      $("again").classList.remove("hidden");
      show("progress");
      return;
    }
    order = body;
    $("qr").src = "/api/v1/orders/" + order.order_id + "/qr.svg";
    $("qr").dataset.content = order.qr;
    $("amount").textContent = yuan(order.amount_fen);
    $("pay-title").textContent = wallet === "wechat" ? t.scan_wechat : t.scan_alipay;
    $("qr-countdown").textContent = mmss((Date.parse(order.expires_at) - Date.now()) / 1000);
    document.body.dataset.status = "awaiting_payment";
    document.body.dataset.order = order.order_id;
    show("pay");
    startPolling();
  }

  function startPolling() {
    clearInterval(poll);
    clearInterval(tick);
    poll = setInterval(refresh, 1000);
    tick = setInterval(() => last && countdowns(last), 250);
    refresh();
  }

  async function refresh() {
    if (!order) return;
    const res = await fetch("/api/v1/orders/" + order.order_id);
    if (!res.ok) return;
    last = await res.json();
    render(last);
  }

  // The run ends at the device's reported time left when the order carries it, else started_at + duration.
  function endsAt(o) {
    if (o.remaining_s != null && o.reported_at) return Date.parse(o.reported_at) + o.remaining_s * 1000;
    return o.started_at ? Date.parse(o.started_at) + o.duration_s * 1000 : null;
  }

  function countdowns(o) {
    const now = Date.now();
    if (o.status === "awaiting_payment") {
      $("qr-countdown").textContent = mmss((Date.parse(o.expires_at) - now) / 1000);
    } else if (o.status === "running") {
      const end = endsAt(o);
      $("run-countdown").textContent = mmss(end ? (end - now) / 1000 : o.duration_s);
    } else {
      $("run-countdown").textContent = "";
    }
  }

  function render(o) {
    $("order-ref").textContent = t.order + " " + o.order_id.slice(0, 8);
    document.body.dataset.status = o.status;
    countdowns(o);
    if (o.status === "awaiting_payment") return;
    show("progress");
    const texts = {
      paid: t.starting, running: t.running, completed: t.done, expired: t.expired,
      refunded: t.refunded, partially_refunded: t.partially_refunded,
    };
    let text = texts[o.status] || o.status;
    if ((o.status === "refunded" || o.status === "partially_refunded") && o.refunded_fen) {
      text += " · " + yuan(o.refunded_fen);
    }
    $("status-text").textContent = text;
    $("status-text").className = "status state-" + o.status;
    const over = ["completed", "expired", "refunded", "partially_refunded"].includes(o.status);
    $("again").classList.toggle("hidden", !over);
    if (over) { clearInterval(poll); clearInterval(tick); }
  }

  $("cancel").addEventListener("click", () => { clearInterval(poll); clearInterval(tick); order = null; last = null; show("choose"); });
  $("again").addEventListener("click", () => { location.reload(); });
  const sandboxPay = $("sandbox-pay");
  if (sandboxPay) {
    sandboxPay.addEventListener("click", async () => {
      if (!order) return;
      await fetch("/sandbox/pay", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ qr: order.qr }) });
    });
  }
})();
