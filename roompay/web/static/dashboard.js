// The staff dashboard: live consumption feed (server-sent events) and room states. No third-party code.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("dashboard-data").textContent);
  const t = data.t;
  const $ = (id) => document.getElementById(id);
  const yuan = (fen) => "¥" + Math.floor(fen / 100) + "." + String(fen % 100).padStart(2, "0");
  const mmss = (s) => {
    s = Math.max(0, Math.round(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    return (h ? h + ":" + String(m).padStart(2, "0") : m) + ":" + String(r).padStart(2, "0");
  };
  const hhmmss = (iso) => new Date(iso).toLocaleTimeString("zh-CN", { hour12: false, timeZone: "Asia/Shanghai" });
  let skew = 0; // server clock minus this browser's clock

  function paintRoom(tile) {
    const el = document.querySelector('[data-device="' + CSS.escape(tile.device) + '"]');
    if (!el) return;
    el.dataset.state = tile.state;
    el.dataset.endsAt = tile.ends_at || "";
    const state = el.querySelector(".state");
    state.className = "state state-" + tile.state;
    state.textContent = t["state_" + tile.state] || tile.state;
  }

  function tickRooms() {
    document.querySelectorAll("[data-device]").forEach((el) => {
      const left = el.querySelector(".left");
      if (el.dataset.state === "running" && el.dataset.endsAt) {
        left.textContent = t.left + " " + mmss((Date.parse(el.dataset.endsAt) - Date.now() - skew) / 1000);
      } else {
        left.textContent = "";
      }
    });
  }

  let refreshing = false;
  async function refreshRooms() {
    if (refreshing) return;
    refreshing = true;
    try {
      const res = await fetch("/dashboard/rooms.json", { credentials: "same-origin" });
      if (res.status === 401) { location.href = "/login"; return; }
      if (!res.ok) return;
      const body = await res.json();
      skew = Date.parse(body.now) - Date.now();
      body.rooms.forEach(paintRoom);
      tickRooms();
    } finally {
      refreshing = false;
    }
  }

  function addFeedItem(item) {
    const feed = $("feed");
    const empty = $("feed-empty");
    if (empty) empty.remove();
    const li = document.createElement("li");
    li.dataset.event = item.event;
    li.dataset.order = item.order_id;
    if (item.comp) {
      li.dataset.comp = "1";
      li.classList.add("comp");
    }
    const time = document.createElement("time");
    time.textContent = hhmmss(item.at);
    const what = document.createElement("strong");
    what.textContent = t["ev_" + item.event] || item.event;
    const where = document.createElement("span");
    where.textContent = " " + t.room + " " + (item.room || "—") + " · " + (data.kinds[item.kind] || item.kind) +
      " · " + item.program + " · " + yuan(item.amount_fen) + " · " + (t[item.wallet] || item.wallet) + " · ";
    const link = document.createElement("a");
    link.href = "/dashboard/orders/" + encodeURIComponent(item.order_id);
    link.textContent = item.order_id.slice(0, 8);
    li.append(time, " ", what, where, link);
    feed.prepend(li);
    while (feed.children.length > 100) feed.lastElementChild.remove();
  }

  if (data.feed && window.EventSource) {
    const source = new EventSource("/api/v1/feed");
    source.addEventListener("order", (e) => {
      addFeedItem(JSON.parse(e.data));
      refreshRooms();
    });
    source.addEventListener("open", () => document.body.dataset.feed = "open");
  }
  setInterval(refreshRooms, 10000);
  setInterval(tickRooms, 1000);
  refreshRooms();
})();
