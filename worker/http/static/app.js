// optrack's dashboard: follows the event stream (/api/v1/events) and redraws from the JSON API
// when something was recorded; no library, no CDN.
// The token comes once from /#token=… (then leaves the address bar) or from the form, and
// lives in sessionStorage: this tab only, gone when it closes.
"use strict";

// A change or an end redraws within DEBOUNCE_MS; what no event announces (an account pause, a
// new operation not polled yet, a finish leaving the "recent" window) within FALLBACK_MS.
const DEBOUNCE_MS = 250;
const FALLBACK_MS = 30000;
const RECONNECT_MS = 2000;
const TOKEN_KEY = "optrack-token";
const STATES = ["PENDING", "PROCESSING", "COMPLETED", "CANCELED", "NOT_FOUND"];
const STATE_COLOR = {
  PENDING: "var(--pending)", PROCESSING: "var(--processing)", COMPLETED: "var(--completed)",
  CANCELED: "var(--canceled)", NOT_FOUND: "var(--not-found)",
};
const SVG = "http://www.w3.org/2000/svg";

const state = {
  token: null, selected: null, listStatus: null, listNext: null, listPages: 1,
  timer: null, stopped: false, stream: null, lastEventId: null, soon: null, account: "",
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "style") node.style.cssText = value; // CSSOM: allowed by the page's CSP
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text != null) node.textContent = text;
  return node;
}

// --- the token --------------------------------------------------------------------------

function takeToken() {
  const match = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    // Out of the address bar, the history and any bookmark.
    history.replaceState(null, "", location.pathname + location.search);
  }
  state.token = sessionStorage.getItem(TOKEN_KEY);
}

function askToken(why) {
  state.stopped = true;
  clearTimeout(state.timer);
  if (state.stream) state.stream.abort();
  $("main").hidden = true;
  $("token-form").hidden = false;
  if (why) $("token-why").textContent = why;
  $("updated").textContent = "waiting for the token";
  $("token-input").focus();
}

class Unauthorized extends Error {}
class Forbidden extends Error {}

// The path with ?account= (or &account=) when the filter names one account.
function withAccount(path) {
  if (!state.account) return path;
  return path + (path.includes("?") ? "&" : "?") + "account=" + encodeURIComponent(state.account);
}

async function api(path) {
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401) throw new Unauthorized();
  if (response.status === 403) throw new Forbidden("HTTP 403");
  if (!response.ok) {
    let reason = "HTTP " + response.status;
    try { reason += ": " + (await response.json()).errors.map((e) => e.reason).join("; "); }
    catch (_) { /* not our JSON */ }
    throw new Error(reason);
  }
  return response.json();
}

// --- formatting -------------------------------------------------------------------------

function time(iso) {
  return iso ? iso.replace("T", " ").replace("Z", "") : "-";
}

function clock(iso) {
  return iso ? iso.slice(11, 19) : "-";
}

function span(seconds) {
  if (seconds == null) return "-";
  let whole = Math.round(Math.abs(seconds));
  const sign = seconds < 0 ? "-" : "";
  const parts = [[86400, "d", 3600, "h"], [3600, "h", 60, "m"], [60, "m", 1, "s"]];
  for (const [big, bigUnit, small, smallUnit] of parts) {
    if (whole >= big) {
      const rest = Math.floor((whole % big) / small);
      return sign + Math.floor(whole / big) + bigUnit +
        (rest ? " " + String(rest).padStart(2, "0") + smallUnit : "");
    }
  }
  return sign + whole + "s";
}

function number(value) {
  return value == null ? "-" : Number(value).toLocaleString("en-US");
}

function percent(fraction) {
  return fraction == null ? "-" : (fraction * 100).toFixed(1) + "%";
}

function statusBadge(status) {
  return el("span", { class: "status " + status, text: status, "data-role": "status" });
}

// --- drawing ----------------------------------------------------------------------------

function drawAccount(account, now) {
  const banner = $("account");
  if (!account) { banner.hidden = true; return; } // a token of some accounts: not its to see
  let text = null;
  banner.classList.remove("paused");
  if (account.paused) {
    text = `Polling paused until ${time(account.paused_until.slice(0, 19) + "Z")} UTC: ` +
      account.pause_reason;
    if (!account.credentials_rejected) banner.classList.add("paused");
  } else if (account.credentials_rejected) {
    text = `Last credentials error at ${time(account.pause_updated_at)} UTC: ` +
      account.pause_reason;
  }
  banner.hidden = text == null;
  banner.textContent = text || "";
}

// The account filter and the per-account table (GET /api/v1/accounts: the token's accounts).
function drawAccounts(page) {
  const filter = $("account-filter");
  const names = page.accounts.map((a) => a.name);
  if (state.account && !names.includes(state.account)) state.account = "";
  filter.replaceChildren(el("option", { value: "", text: "every account" }),
    ...names.map((name) => el("option", { value: name, text: name })));
  filter.value = state.account;
  const rows = page.accounts.map((a) => el("tr", { "data-account": a.name },
    el("td", { text: a.name }),
    el("td", { class: "num", text: number(a.active) }),
    el("td", { text: a.paused ? `until ${time(a.paused_until)}` : "no" }),
    el("td", { class: "num", text: a.failure_rate === null ? "–" : percent(a.failure_rate) })));
  $("account-rows").replaceChildren(...rows);
}

function card(label, value, alert = false) {
  return el("div", { class: "card" + (alert ? " alert" : ""), "data-card": label },
    el("div", { class: "label", text: label }), el("div", { class: "value", text: value }));
}

function drawSummary(report) {
  const by = report.operations.by_status;
  const s = report.senders;
  const active = (by.PENDING || 0) + (by.PROCESSING || 0);
  $("cards").replaceChildren(
    card("operations", number(report.operations.total)),
    card("active", number(active)),
    card("completed", number(by.COMPLETED)),
    card("canceled", number(by.CANCELED)),
    card("not found", number(by.NOT_FOUND), by.NOT_FOUND > 0),
    card("senders created", number(s.created)),
    card("senders failed", number(s.failed), s.failed > 0),
    card("still queued", number(s.queued)),
    card("failure rate", percent(s.failure_rate)),
    card("time to finish p50", span(report.time_to_finish_seconds.p50)),
    card("stuck", number(report.stuck.count), report.stuck.count > 0),
    card("in error", number(report.in_error.count), report.in_error.count > 0),
  );
  const total = report.operations.total || 0;
  const bar = $("status-bar");
  bar.replaceChildren(...STATES.filter((st) => by[st]).map((st) => el("span", {
    title: `${st}: ${by[st]}`,
    style: `width:${(100 * by[st]) / total}%;background:${STATE_COLOR[st]}`,
  })));
  $("status-legend").replaceChildren(...STATES.map((st) => {
    const button = el("button", { type: "button", "data-status": st },
      el("span", { class: "dot", style: `background:${STATE_COLOR[st]}` }),
      `${st} ${number(by[st] || 0)}`);
    if (state.listStatus === st) button.classList.add("active");
    button.addEventListener("click", () => openList(st));
    return button;
  }));
}

function segment(kind, value, total) {
  const width = total ? (100 * (value || 0)) / total : 0;
  return el("span", { class: "seg " + kind, style: `width:${width}%`, title: `${kind}: ${value}` });
}

function etaText(item, now) {
  const op = item.operation;
  const est = item.estimate;
  if (!["PENDING", "PROCESSING"].includes(op.status)) return "ended " + time(op.ended_at);
  if (!est.eta) return "ETA unknown (" + (est.note || "no basis") + ")";
  const left = (Date.parse(est.eta) - Date.parse(now)) / 1000;
  return left >= 0 ? `ETA ${clock(est.eta)} UTC (in ${span(left)})`
    : `ETA ${clock(est.eta)} UTC (overdue by ${span(-left)})`;
}

function drawProgress(data) {
  const rows = data.progress.map((item) => {
    const op = item.operation;
    const done = (op.created || 0) + (op.failed || 0);
    const bar = el("div", {
      class: "bar" + (op.total ? "" : " unknown"), "data-role": "bar",
      "data-done": String(done), "data-total": String(op.total ?? ""),
    });
    if (op.total) {
      bar.append(segment("created", op.created, op.total), segment("failed", op.failed, op.total),
        segment("queued", op.queued, op.total));
    }
    const row = el("div", { class: "op", "data-op": op.id, "data-status": op.status, title: op.id },
      el("span", { class: "id", text: op.id }),
      el("span", {}, statusBadge(op.status)),
      bar,
      el("span", { class: "count", text: op.total ? `${number(done)}/${number(op.total)}` : "?/?" }),
      el("span", { class: "eta", text: etaText(item, data.now) }),
      op.last_error
        ? el("span", { class: "error", text: `${op.consecutive_errors} error(s): ${op.last_error}` })
        : null,
    );
    if (op.id === state.selected) row.classList.add("selected");
    row.addEventListener("click", () => select(op.id));
    return row;
  });
  $("progress").replaceChildren(...rows);
  $("progress-empty").hidden = rows.length > 0;
}

async function openList(status) {
  state.listStatus = status;
  state.listPages = 1;
  await refreshList();
  for (const b of $("status-legend").children) {
    b.classList.toggle("active", b.dataset.status === status);
  }
}

async function refreshList(more = false) {
  if (!state.listStatus) return;
  const params = new URLSearchParams({ status: state.listStatus, limit: "50" });
  if (more && state.listNext) params.set("cursor", state.listNext);
  const page = await api(withAccount("/api/v1/operations?" + params));
  const rows = page.operations.map((op) => {
    const row = el("tr", { class: "pick", "data-op": op.id },
      el("td", { class: "id", text: op.id }), el("td", {}, statusBadge(op.status)),
      el("td", { class: "num", text: number(op.created) }),
      el("td", { class: "num", text: number(op.failed) }),
      el("td", { class: "num", text: number(op.queued) }),
      el("td", { class: "num", text: number(op.total) }),
      el("td", { text: time(op.last_polled_at) }),
      el("td", { class: "error", text: op.last_error || "" }));
    row.addEventListener("click", () => select(op.id));
    return row;
  });
  if (more) $("status-rows").append(...rows);
  else $("status-rows").replaceChildren(...rows);
  state.listNext = page.next;
  $("status-list").hidden = false;
  $("status-list-title").textContent = `${state.listStatus} operations`;
  $("status-more").hidden = !page.next;
}

function select(id) {
  state.selected = id;
  for (const row of document.querySelectorAll(".op")) {
    row.classList.toggle("selected", row.dataset.op === id);
  }
  refreshHistory().catch(showError);
}

async function refreshHistory() {
  if (!state.selected) return;
  const report = await api(`/api/v1/operations/${encodeURIComponent(state.selected)}/history`);
  const op = report.operation;
  $("history").hidden = false;
  $("history").dataset.op = op.id;
  $("history-title").replaceChildren(`History of ${op.id} `, statusBadge(op.status));
  $("history-facts").textContent =
    `created at ${time(op.remote_created_at)} UTC, tracked at ${time(op.tracked_at)} UTC; ` +
    `${report.history.length} recorded change(s); ${op.polls} poll(s)`;
  const est = report.estimate;
  $("history-estimate").textContent = est.eta
    ? `estimated finish ${time(est.eta)} UTC: ${est.remaining} left at ` +
      `${est.rate_per_minute} per minute; ${est.note}`
    : `estimated finish: none; ${est.note}`;
  drawChart(report);
}

// 1, 2 or 5 times a power of ten: axis ticks people read at a glance.
function niceStep(rough) {
  const power = 10 ** Math.floor(Math.log10(Math.max(rough, 1)));
  const step = [1, 2, 5, 10].find((m) => m * power >= rough) * power;
  return Math.max(1, step);
}

function drawChart(report) {
  const op = report.operation;
  const W = 760, H = 270, L = 48, R = 16, T = 30, B = 30;
  const points = report.history.map((r) => ({
    t: Date.parse(r.remote_updated_at), created: r.created, failed: r.failed, queued: r.queued,
  }));
  if (op.remote_created_at && points.length && op.total != null) {
    points.unshift({ t: Date.parse(op.remote_created_at), created: 0, failed: 0, queued: op.total });
  }
  const chart = $("chart");
  if (points.length < 1) {
    chart.replaceChildren(el("p", { class: "empty", text: "No recorded change yet." }));
    return;
  }
  const eta = report.estimate.eta ? Date.parse(report.estimate.eta) : null;
  const t0 = points[0].t;
  const t1 = Math.max(points[points.length - 1].t, eta || 0, t0 + 1000);
  const top = Math.max(1, op.total || 0, ...points.map((p) => Math.max(p.created, p.queued)));
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `history chart of ${op.id}` });
  for (let v = 0; v <= top; v += niceStep(top / 4)) {
    root.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }),
      svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, number(v)));
  }
  for (let i = 0; i <= 4; i++) {
    const t = t0 + ((t1 - t0) * i) / 4;
    root.append(svg("text", { x: x(t), y: H - 10, "text-anchor": "middle" },
      new Date(t).toISOString().slice(11, 19)));
  }
  root.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }),
    svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  for (const kind of ["queued", "failed", "created"]) {
    const path = points.map((p) => `${x(p.t).toFixed(1)},${y(p[kind]).toFixed(1)}`).join(" ");
    root.append(svg("polyline", { class: "line " + kind, points: path, "data-series": kind }));
    for (const p of points) {
      root.append(svg("circle", { class: kind, cx: x(p.t), cy: y(p[kind]), r: 2.5 }));
    }
  }
  if (eta && op.status === "PROCESSING") {
    const last = points[points.length - 1];
    root.append(svg("polyline", { class: "line projection",
      points: `${x(last.t)},${y(last.created + last.failed)} ${x(eta)},${y(op.total)}` }),
    svg("text", { x: x(eta) - 4, y: y(op.total) - 4, "text-anchor": "end" }, "ETA"));
  }
  const legend = [["created", "created"], ["failed", "failed"], ["queued", "queued"]];
  legend.forEach(([kind, label], i) => {
    root.append(svg("rect", { class: kind, x: L + i * 90, y: 8, width: 12, height: 4 }),
      svg("text", { x: L + 16 + i * 90, y: 14 }, label));
  });
  chart.replaceChildren(root);
}

// --- the loop ---------------------------------------------------------------------------

function showError(error) {
  if (error instanceof Unauthorized) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    askToken("The token was refused: give the current OPTRACK_HTTP_TOKEN.");
    return;
  }
  const banner = $("offline");
  banner.hidden = false;
  banner.textContent = `Cannot read optrack (${error.message}); retrying every ` +
    `${RECONNECT_MS / 1000} s.`;
}

async function refresh() {
  if (state.stopped) return;
  clearTimeout(state.timer);
  try {
    const [account, accounts, report, progress] = await Promise.all([
      api("/api/v1/account").catch((e) => { if (e instanceof Forbidden) return null; throw e; }),
      api("/api/v1/accounts"),
      api(withAccount("/api/v1/report?limit=0")),
      api(withAccount("/api/v1/progress?limit=50")),
    ]);
    $("main").hidden = false;
    $("token-form").hidden = true;
    $("offline").hidden = true;
    drawAccount(account, progress.now);
    drawAccounts(accounts);
    drawSummary(report);
    drawProgress(progress);
    if (state.listStatus && state.listPages === 1) await refreshList();
    await refreshHistory();
    $("updated").textContent = `updated ${clock(progress.now)} UTC · live`;
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  } catch (error) {
    showError(error);
    if (state.stopped) return;
    state.timer = setTimeout(refresh, RECONNECT_MS);
    return;
  }
  state.timer = setTimeout(refresh, FALLBACK_MS);
  if (!state.stream) follow();
}

// One redraw for a burst of events, however many.
function refreshSoon() {
  if (state.soon) return;
  state.soon = setTimeout(() => { state.soon = null; refresh(); }, DEBOUNCE_MS);
}

// --- the event stream -------------------------------------------------------------------
// fetch, not EventSource: EventSource cannot send the Authorization header, and the token
// must not go into a URL. Reconnects resume after the last event seen (Last-Event-ID).

function onEvent(fields) {
  if (fields.id) state.lastEventId = fields.id;
  if (!fields.event) return;
  document.body.dataset.events = String(Number(document.body.dataset.events || 0) + 1);
  refreshSoon();
}

async function follow() {
  if (state.stopped) return;
  const controller = new AbortController();
  state.stream = controller;
  const headers = { Accept: "text/event-stream", Authorization: "Bearer " + state.token };
  if (state.lastEventId) headers["Last-Event-ID"] = state.lastEventId;
  try {
    const response = await fetch(withAccount("/api/v1/events"), {
      headers, cache: "no-store", signal: controller.signal,
    });
    if (response.status === 401) throw new Unauthorized();
    if (!response.ok) throw new Error("HTTP " + response.status);
    document.body.dataset.stream = "open";
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let fields = {};
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/\r$/, "");
        buffer = buffer.slice(end + 1);
        if (line === "") { onEvent(fields); fields = {}; continue; }
        if (line.startsWith(":")) continue; // a heartbeat
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        fields[name] = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      }
    }
  } catch (error) {
    if (controller.signal.aborted) return;
    if (error instanceof Unauthorized) { showError(error); return; }
  } finally {
    if (state.stream === controller) state.stream = null;
    document.body.dataset.stream = "closed";
  }
  // The stream ended (a restart, a proxy): redraw what was missed, then follow again.
  setTimeout(() => { refreshSoon(); }, RECONNECT_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  takeToken();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("token-input").value.trim();
    $("token-input").value = "";
    sessionStorage.setItem(TOKEN_KEY, state.token);
    state.stopped = false;
    $("token-form").hidden = true;
    refresh();
  });
  $("account-filter").addEventListener("change", () => {
    state.account = $("account-filter").value;
    if (state.stream) state.stream.abort(); // follow again, for this account's events
    state.stream = null;
    refresh();
  });
  $("status-more").addEventListener("click", () => {
    state.listPages += 1;
    refreshList(true).catch(showError);
  });
  refresh();
});
