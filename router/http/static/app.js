// llm-router dashboard: polls the router's HTTP API every 2 s and follows log streams over SSE.
// Plain JS on purpose: no build step, nothing fetched from outside the router.
"use strict";

const REFRESH_MS = 2000;
const LAB_REFRESH_MS = 10000; // usage and audit: reports, not live state
const LOG_CAP = 2000;          // lines kept in the log view
const MAX_WATCHERS = 3;        // SSE connections for "latest line while starting" (browsers allow ~6 per host)
const LOG_HISTORY = 500;       // past lines asked for when a log view opens
const ACTIVE = new Set(["starting", "running", "stopping", "failed"]);
const MIB = 1024 * 1024;

const $ = (sel, root = document) => root.querySelector(sel);
const byTestId = (id) => $(`[data-testid="${CSS.escape(id)}"]`);

const state = {
  models: [],                  // /v1/models data, instances enriched from /api/models/{id}/info
  pending: new Map(),          // model id -> {action, since}: a click the router has not reflected yet
  watchers: new Map(),         // model id -> {es, line}: latest log line of a starting model
  selected: null,              // model id whose log is shown
  plan: null,                  // /api/plan: what fits where (host cards)
  refreshing: false,
};
const drawn = new WeakMap();   // element -> the HTML last drawn into it, to skip unchanged redraws

// Replace an element's HTML only when it changed: no flicker, hover and selection survive.
function draw(el, html) {
  if (drawn.get(el) === html) return;
  el.innerHTML = html;
  drawn.set(el, html);
}

// ---------- helpers ----------

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

function fmtMiB(mib) {
  const v = Number(mib) || 0;
  return v >= 1024 ? `${(v / 1024).toFixed(1)} GiB` : `${Math.round(v)} MiB`;
}

function fmtPair(used, total) {
  const t = Number(total) || 0;
  if (t >= 1024) return `${((Number(used) || 0) / 1024).toFixed(1)} / ${(t / 1024).toFixed(1)} GiB`;
  return `${Math.round(Number(used) || 0)} / ${Math.round(t)} MiB`;
}

function fmtDuration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

function fmtTime(ts) {
  const d = new Date((Number(ts) || 0) * 1000);
  return d.toTimeString().slice(0, 8);
}

function hostOf(url) {
  try { return new URL(url).host; } catch { return url || ""; }
}

// API key (when the router has keys on): kept in a cookie so that EventSource (log streams),
// which cannot send headers, carries it too; the router honours the cookie for GET/HEAD only,
// so fetch() sends it as a Bearer header as well (POSTs need that). Asked for on a 401.
const KEY_COOKIE = "llm_router_key";
let askingKey = null;

function storedKey() {
  const m = document.cookie.match(new RegExp(`(?:^|; )${KEY_COOKIE}=([^;]*)`));
  return m ? m[1] : "";
}

function askKey() {
  askingKey = askingKey || new Promise((resolve) => {
    const key = (window.prompt("This router needs an API key:") || "").trim();
    if (key) {
      const secure = location.protocol === "https:" ? "; Secure" : "";
      document.cookie = `${KEY_COOKIE}=${key}; path=/; SameSite=Strict${secure}`;
    }
    resolve(Boolean(key));
  }).finally(() => { setTimeout(() => { askingKey = null; }, 0); });
  return askingKey;
}

async function api(method, path, retried = false) {
  const headers = {Accept: "application/json"};
  const key = storedKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const resp = await fetch(path, {method, headers, cache: "no-store"});
  if (resp.status === 401 && !retried && await askKey()) return api(method, path, true);
  let body = {};
  try { body = await resp.json(); } catch { /* empty or non-JSON body */ }
  if (!resp.ok) {
    const msg = body.message || (body.error && body.error.message) || `HTTP ${resp.status}`;
    const err = new Error(msg);
    err.status = resp.status;
    err.body = body;
    throw err;
  }
  return body;
}

function toast(text, kind = "error") {
  const el = document.createElement("div");
  el.className = `toast ${kind}`;
  el.textContent = text;
  byTestId("toasts").appendChild(el);
  setTimeout(() => el.remove(), 8000);
}

// ---------- refresh loop ----------

async function refresh() {
  if (state.refreshing) return;
  state.refreshing = true;
  try {
    const [health, models, devices, plan] = await Promise.allSettled([
      fetch("/health", {cache: "no-store"}).then(async (r) => ({status: r.status, body: await r.json().catch(() => ({}))})),
      api("GET", "/v1/models"),
      api("GET", "/api/devices/info"),
      api("GET", "/api/plan"),
    ]);
    state.plan = plan.status === "fulfilled" ? plan.value : null;
    renderHealth(health);
    if (models.status === "fulfilled") {
      state.models = await enrich(models.value.data || []);
      document.body.classList.remove("stale");
    } else {
      document.body.classList.add("stale");
    }
    settlePending();
    syncWatchers();
    renderModels();
    if (devices.status === "fulfilled") renderHosts(devices.value);
    else if (devices.reason.status === 503) renderHosts({hosts: {}}, devices.reason.message);  // no worker has reported yet
    byTestId("updated").textContent = `updated ${new Date().toTimeString().slice(0, 8)}`;
  } finally {
    state.refreshing = false;
  }
}

// /v1/models has worker/state/url per instance; pid, restarts, errors, prefetch progress and the
// requests in flight and queued on every router come from /info, fetched only for models that
// are not stopped or that wait (few, and the ones an operator looks at).
async function enrich(models) {
  await Promise.all(models.map(async (m) => {
    if (!m.pending && !ACTIVE.has(m.status) && !(m.instances || []).some((i) => ACTIVE.has(i.state))) return;
    try {
      const info = await api("GET", `/api/models/${encodeURIComponent(m.id)}/info`);
      const detail = new Map((info.model?.instances || []).map((i) => [i.worker, i]));
      m.instances = (m.instances || []).map((i) => ({...detail.get(i.worker), ...i}));
      m.inflight = info.model?.inflight || 0;
      m.queued = info.model?.queued || 0;
    } catch { /* keep the summary we have */ }
  }));
  return models;
}

function loop() {
  refresh().catch((e) => console.error(e)).finally(() => setTimeout(loop, REFRESH_MS));
}

// ---------- health ----------

function renderHealth(result) {
  const pill = byTestId("health");
  const text = byTestId("health-text");
  if (result.status !== "fulfilled") {
    pill.dataset.state = "down";
    text.textContent = "router unreachable";
    byTestId("summary").textContent = "";
    return;
  }
  const {status, body} = result.value;
  const healthy = status === 200 && body.status === "healthy";
  pill.dataset.state = healthy ? "ok" : "bad";
  const parts = [`router ${body.status || `HTTP ${status}`}`];
  if ("redis" in body) {
    const r = body.redis;
    const ok = r === true || r === "ok" || r === "connected" || (r && typeof r === "object" && (r.ok || r.connected));
    parts.push(ok ? "redis ok" : `redis ${typeof r === "string" ? r : "down"}`);
  }
  text.textContent = parts.join(" · ");
  const total = body.models_count ?? state.models.length;
  const running = body.running_models ?? state.models.filter((m) => m.status === "running").length;
  const workers = typeof body.workers === "number" ? ` · ${body.workers} worker${body.workers === 1 ? "" : "s"}` : "";
  byTestId("summary").textContent = `${running} / ${total} models running${workers}`;
}

// ---------- models table ----------

function modelStatus(m) {
  const p = state.pending.get(m.id);
  if (p && p.action === "stop" && m.status !== "stopped") return "stopping";
  if (p && p.action === "start" && !p.begun && m.status !== "running") return "starting";
  // requests wait for a swap to it (any router's): it will start, it is not just "stopped"
  if (m.pending?.kind === "queued" && m.status !== "running" && m.status !== "starting") return "waiting";
  return m.status || "stopped";
}

// What changes when a worker acts on a model: its instances' states and update times.
function instanceSig(m) {
  return (m?.instances || []).map((i) => `${i.worker}:${i.state}:${i.updated_at ?? ""}`).join(" ");
}

// A click stays "pending" until the router shows the worker acted on it, so the row does not
// flicker back to Start (or to an earlier "failed") between the 202 and the worker's move.
function settlePending() {
  const now = Date.now();
  for (const [id, p] of state.pending) {
    const m = state.models.find((x) => x.id === id);
    // a start that waits for a swap has begun too (the router answered 202 and queued it)
    const waits = m?.pending?.kind === "queued";
    if (m) p.begun = p.begun || m.status === "starting" || waits || instanceSig(m) !== p.sig;
    const settled = !m
      || (p.action === "start" && (m.status === "running" || (p.begun && m.status !== "starting" && !waits)))
      || (p.action === "stop" && m.status === "stopped")
      || now - p.since > 10 * 60 * 1000;
    if (settled) {
      state.pending.delete(id);
      if (m && p.action === "start" && m.status !== "running") toast(`${id} failed to start${errorText(m) ? `: ${errorText(m)}` : ""}`);
    }
  }
}

function errorText(m) {
  return (m.instances || []).map((i) => i.last_error).filter(Boolean).join("; ");
}

// One host's instance of model ``id``, with its own Start/Stop (``?worker=``: that host only).
// The engine's address is text, not a link: it is the worker's loopback or LAN address, which a
// remote browser cannot reach, and requests belong to the router anyway.
function instanceHtml(id, i) {
  const bits = [];
  if (i.url) bits.push(`<span class="inst-url" title="the engine's own address (clients go through the router)">${esc(hostOf(i.url))}</span>`);
  if (i.pid) bits.push(`pid ${esc(i.pid)}`);
  if (i.restarts) bits.push(`<span class="warn" title="restarts">↻ ${esc(i.restarts)}</span>`);
  if (i.state === "running" && i.started_at) bits.push(`up ${fmtDuration(Date.now() / 1000 - i.started_at)}`);
  if (i.prefetching) {
    const {done, total} = i.prefetching;
    bits.push(`<span data-testid="prefetch-${esc(id)}@${esc(i.worker)}" title="its weight files read into this host's page cache before its start">`
      + `${done >= total ? "prefetched" : "prefetching"} ${esc(fmtPair(done / MIB, total / MIB))}</span>`);
  }
  const err = i.last_error && i.state !== "running"
    ? `<div class="inst-error" title="${esc(i.last_error)}">${esc(i.last_error)}</div>` : "";
  const key = `${esc(id)}@${esc(i.worker)}`;
  const button = i.state === "stopped" || i.state === "failed"
    ? `<button class="btn tiny" data-action="start" data-worker="${esc(i.worker)}" data-testid="start-${key}" title="start on ${esc(i.worker)} only">Start</button>`
    : i.state === "running" || i.state === "starting"
      ? `<button class="btn tiny" data-action="stop" data-worker="${esc(i.worker)}" data-testid="stop-${key}" title="stop on ${esc(i.worker)} only">Stop</button>`
      : "";
  return `<div class="inst"><span class="sdot s-${esc(i.state)}" title="${esc(i.state)}"></span>`
    + `<b>${esc(i.worker)}</b><span class="muted">${bits.join(" · ")}</span>${button}${err}</div>`;
}

// Why a model waits (router/explain.py), the same on every router: its reason and position,
// the requests waiting on all routers and for how long, the ETA.
function waitText(p) {
  const parts = [p.message || p.kind];
  const since = p.since ? ` for ${fmtDuration(Date.now() / 1000 - p.since)}` : "";
  if (p.waiting) parts.push(`${p.waiting} request${p.waiting === 1 ? "" : "s"} waiting${since}`);
  if (p.eta) parts.push(`ETA ${fmtDuration(Math.max(0, p.eta - Date.now() / 1000))}`);
  return parts.join(" · ");
}

function rowHtml(m) {
  const status = modelStatus(m);
  const aliases = (m.aliases || []).filter((a) => a !== m.id);
  const pending = state.pending.get(m.id);
  const elapsed = pending && status === "starting" ? ` ${fmtDuration((Date.now() - pending.since) / 1000)}` : "";
  const waitWhy = m.pending ? `<div class="wait-why" data-testid="pending-${esc(m.id)}">${esc(waitText(m.pending))}</div>` : "";
  const watcher = state.watchers.get(m.id);
  const latest = status === "starting"
    ? `<div class="latest" data-testid="latest-${esc(m.id)}">${esc(watcher?.line || "waiting for output…")}</div>` : "";
  const busy = status === "starting" || status === "stopping" || status === "waiting";
  const canStop = status === "running" || status === "starting" || status === "failed";
  const buttons = [
    status !== "running" && status !== "starting" && status !== "waiting"
      ? `<button class="btn primary" data-action="start" data-testid="start-${esc(m.id)}" ${busy ? "disabled" : ""}>Start</button>` : "",
    canStop ? `<button class="btn" data-action="stop" data-testid="stop-${esc(m.id)}" ${status === "stopping" ? "disabled" : ""}>Stop</button>` : "",
  ].join("");
  const instances = (m.instances || []).length
    ? (m.instances || []).map((i) => instanceHtml(m.id, i)).join("") : `<span class="muted">no host</span>`;
  return `<td class="model-cell"><div class="mid">${esc(m.id)}</div>`
    + (aliases.length ? `<div class="aliases">${aliases.map((a) => `<span class="chip">${esc(a)}</span>`).join("")}</div>` : "")
    + `${latest}${waitWhy}</td>`
    + `<td><span class="mode">${esc(m.mode || "-")}</span></td>`
    + `<td class="status-cell"><span class="badge b-${esc(status)}" data-testid="status-${esc(m.id)}">${esc(status)}</span>`
    + `<span class="muted small">${elapsed}</span>${loadHtml(m)}</td>`
    + `<td class="inst-cell">${instances}</td>`
    + `<td class="actions">${buttons}</td>`;
}

// Requests of the model in flight now on every router, and of those the ones waiting for a swap.
function loadHtml(m) {
  if (!m.inflight && !m.queued) return "";
  const queued = m.queued ? ` · ${m.queued} queued` : "";
  return `<div class="load small" data-testid="load-${esc(m.id)}">${m.inflight || 0} in flight${queued}</div>`;
}

function renderModels() {
  const body = byTestId("models-body");
  const filter = byTestId("filter").value.trim().toLowerCase();
  const shown = state.models.filter((m) => !filter
    || [m.id, ...(m.aliases || [])].some((n) => String(n).toLowerCase().includes(filter)));
  const keep = new Set();
  let prev = null;
  for (const m of shown) {
    keep.add(m.id);
    let tr = body.querySelector(`tr[data-model="${CSS.escape(m.id)}"]`);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.model = m.id;
      tr.dataset.testid = `row-${m.id}`;
    }
    draw(tr, rowHtml(m));
    tr.classList.toggle("selected", m.id === state.selected);
    const next = prev ? prev.nextSibling : body.firstChild;
    if (next !== tr) body.insertBefore(tr, next);
    prev = tr;
  }
  for (const tr of [...body.children]) if (!keep.has(tr.dataset.model)) tr.remove();
  byTestId("models-empty").hidden = state.models.length > 0;
}

// One host's Start/Stop: no row-wide pending state (the model may run elsewhere all along);
// the instance's own state shows the progress at the next refresh.
async function actOn(id, action, worker) {
  const query = new URLSearchParams({worker, ...(action === "start" ? {wait: "false"} : {})});
  try {
    await api("POST", `/api/models/${encodeURIComponent(id)}/${action}?${query}`);
  } catch (e) {
    toast(`${action} ${id} on ${worker}: ${e.message}`);
  }
  syncWatchers();
  refresh();
}

async function act(id, action) {
  const model = state.models.find((m) => m.id === id);
  state.pending.set(id, {action, since: Date.now(), sig: instanceSig(model), begun: false});
  renderModels();
  const path = `/api/models/${encodeURIComponent(id)}/${action}${action === "start" ? "?wait=false" : ""}`;
  try {
    await api("POST", path);
  } catch (e) {
    state.pending.delete(id);
    toast(`${action} ${id}: ${e.message}`);
  }
  syncWatchers();
  refresh();
}

// ---------- "latest line while starting" watchers ----------

function syncWatchers() {
  const starting = state.models.filter((m) => modelStatus(m) === "starting").map((m) => m.id);
  for (const [id, w] of state.watchers) {
    if (!starting.includes(id)) { w.es.close(); state.watchers.delete(id); }
  }
  for (const id of starting) {
    if (state.watchers.has(id) || state.watchers.size >= MAX_WATCHERS) continue;
    // After our own click, no history: its last line is the previous run's. Otherwise the latest line.
    const tail = state.pending.has(id) ? 0 : 1;
    const w = {es: new EventSource(`/api/models/${encodeURIComponent(id)}/logs/stream?tail=${tail}`), line: ""};
    w.es.onmessage = (ev) => {
      let data;
      try { data = JSON.parse(ev.data); } catch { return; }
      if (data.log && data.log.message) {
        w.line = data.log.message;
        const el = byTestId(`latest-${id}`);
        if (el) el.textContent = w.line;
      }
      if (data.type === "stream_end" || data.type === "error") w.es.close();
    };
    state.watchers.set(id, w);
  }
}

// ---------- hosts ----------

function meter(label, sub, used, total, extra = "") {
  const pct = total > 0 ? Math.min(100, (used / total) * 100) : 0;
  const level = pct >= 90 ? "hot" : pct >= 70 ? "warm" : "ok";
  return `<div class="meter"><div class="meter-label"><b>${esc(label)}</b> <span class="muted">${esc(sub)}</span>`
    + `<span class="meter-val">${esc(fmtPair(used, total))}${extra}</span></div>`
    + `<div class="bar"><i class="${level}" style="width:${pct.toFixed(1)}%"></i></div></div>`;
}

// What /api/plan says of one host: what a start now would do for the models that are not
// loaded, the sets of models that fit its GPUs at once, estimates far from their measurement.
function planHtml(wid) {
  const host = (state.plan?.hosts || []).find((h) => h.worker === wid);
  if (!host) return "";
  const vram = (m) => (m.profiles || []).filter((p) => p.source !== "cpu")
    .map((p) => `${fmtMiB(p.vram_mb)} ${p.source}`).join(", ");
  const now = (m) => m.now === "evicts" ? `would evict ${m.evicts.join(", ")}`
    : m.now === "no_room" ? (m.fits_alone ? "no room now" : "fits nowhere here") : m.now === "fits" ? "fits now" : m.now;
  const rows = (host.models || []).filter((m) => vram(m) && !["running", "starting", "stopping"].includes(m.now))
    .map((m) => `<div class="plan-row" data-testid="plan-${esc(wid)}-${esc(m.model)}"><b>${esc(m.model)}</b> `
      + `<span class="muted">${esc(vram(m))}</span> · ${esc(now(m))}</div>`).join("");
  const sets = (host.together || []).map((s) => `{${s.join(", ")}}`).join(" · ");
  const off = (state.plan.disagree || []).filter((d) => d.figures.worker === wid)
    .map((d) => `<div class="plan-row warn">${esc(d.model)}: estimated ${esc(fmtMiB(d.figures.estimated_mb))}, `
      + `measured ${esc(fmtMiB(d.figures.measured_mb))}</div>`).join("");
  if (!rows && !sets && !off) return "";
  return `<div class="plan" data-testid="plan-${esc(wid)}"><div class="plan-head">Plan</div>${rows}`
    + (sets ? `<div class="plan-row muted" data-testid="together-${esc(wid)}">fit together: ${esc(sets)}</div>` : "")
    + off + `</div>`;
}

function renderHosts(body, emptyText = "No live hosts.") {
  const hosts = body.hosts || {};
  const ids = Object.keys(hosts).sort();
  const now = Date.now() / 1000;
  const html = ids.map((wid) => {
    const h = hosts[wid] || {};
    const cuda = h.cuda || {};
    const cpu = h.cpu || {};
    const age = h.ts ? now - h.ts : 0;
    const gpus = cuda.online
      ? (cuda.gpus || []).map((g) => meter(`GPU ${g.index}`, g.name || "", g.memory_used, g.memory_total,
        ` · ${esc(g.utilization ?? 0)}%`)).join("") || `<div class="muted small">no GPUs</div>`
      : `<div class="gpu-offline" data-testid="gpu-offline-${esc(wid)}">GPU offline: ${esc(cuda.error || "no NVIDIA driver")}</div>`;
    const cpuLabel = `${cpu.cpu_count ?? "?"} cores` + (cpu.cpu_percent != null ? ` · ${Math.round(cpu.cpu_percent)}%` : "");
    return `<div class="host-card" data-testid="host-${esc(wid)}">`
      + `<div class="host-head"><b>${esc(wid)}</b>`
      + (h.host && h.host !== wid ? `<span class="muted">${esc(h.host)}</span>` : "")
      + (cuda.driver ? `<span class="muted small">driver ${esc(cuda.driver)}</span>` : "")
      + `<span class="age ${age > 15 ? "stale-age" : ""}" title="age of this snapshot">${h.ts ? fmtDuration(age) + " ago" : ""}</span></div>`
      + gpus + meter("RAM", cpuLabel, cpu.memory_used, cpu.memory_total) + planHtml(wid) + `</div>`;
  }).join("");
  draw(byTestId("hosts"), html || `<div class="empty">${esc(emptyText)}</div>`);
  const c = body.devices?.cuda?.info;
  byTestId("hosts-summary").textContent = `${ids.length} host${ids.length === 1 ? "" : "s"}`
    + (c && c.device_count ? ` · ${c.device_count} GPU · ${fmtMiB(c.memory_free)} free` : "");
}

// ---------- log view ----------

const logView = {
  es: null,
  queue: [],
  flushTimer: null,
  lastId: "",
  lines: 0,  // log lines shown since open, to tell "no history" apart

  open(id) {
    this.close();
    state.selected = id;
    this.lastId = "";
    this.lines = 0;
    byTestId("log-model").textContent = id;
    const view = byTestId("log-view");
    view.replaceChildren();
    this.setConn("connecting");
    const es = new EventSource(`/api/models/${encodeURIComponent(id)}/logs/stream?tail=${LOG_HISTORY}`);
    this.es = es;
    es.onopen = () => this.setConn("live");
    es.onerror = () => this.setConn(es.readyState === EventSource.CLOSED ? "closed" : "reconnecting");
    es.onmessage = (ev) => this.onEvent(ev);
    renderModels();
  },

  close() {
    if (this.es) this.es.close();
    this.es = null;
    state.selected = null;
    this.setConn("idle");
  },

  setConn(s) {
    const el = byTestId("log-conn");
    el.dataset.state = s;
    el.textContent = s === "idle" ? "" : s;
  },

  onEvent(ev) {
    let data;
    try { data = JSON.parse(ev.data); } catch { return; }
    if (data.log) {
      // After a reconnect the browser sends Last-Event-ID; if history is replayed anyway, skip older lines.
      if (ev.lastEventId && this.lastId && compareIds(ev.lastEventId, this.lastId) < 0) return;
      if (ev.lastEventId) this.lastId = ev.lastEventId;
      this.lines += 1;
      this.push(data.log);
    }
    else if (data.type === "historical_complete") this.push({marker: this.lines ? "live" : "no earlier lines · live"});
    else if (data.type === "stream_end") { this.push({marker: "stream ended"}); this.es?.close(); this.setConn("ended"); }
    else if (data.type === "error") { this.push({marker: `error: ${data.message || "log stream failed"}`}); this.es?.close(); this.setConn("closed"); }
  },

  push(item) {
    this.queue.push(item);
    if (!this.flushTimer) this.flushTimer = setTimeout(() => this.flush(), 30);
  },

  flush() {  // batched: a long history arrives as thousands of events in one burst
    this.flushTimer = null;
    const view = byTestId("log-view");
    const frag = document.createDocumentFragment();
    for (const item of this.queue.splice(0).slice(-LOG_CAP)) {
      const row = document.createElement("div");
      if (item.marker) {
        row.className = "ln marker";
        row.textContent = `── ${item.marker} ──`;
      } else {
        row.className = `ln st-${item.stream || "stdout"}`;
        for (const [cls, text] of [["t", fmtTime(item.timestamp)], ["h", item.host || "-"],
          ["s", item.stream || "stdout"], ["m", item.message ?? ""]]) {
          const span = document.createElement("span");
          span.className = cls;
          span.textContent = text;
          row.appendChild(span);
        }
      }
      frag.appendChild(row);
    }
    view.appendChild(frag);
    while (view.childElementCount > LOG_CAP) view.firstElementChild.remove();
    if (byTestId("log-autoscroll").checked) view.scrollTop = view.scrollHeight;
  },
};

// Redis stream ids ("ms-seq") order numerically; anything else is treated as unordered.
function compareIds(a, b) {
  const pa = /^(\d+)-(\d+)$/.exec(a), pb = /^(\d+)-(\d+)$/.exec(b);
  if (!pa || !pb) return 1;
  return (Number(pa[1]) - Number(pb[1])) || (Number(pa[2]) - Number(pb[2]));
}

// ---------- lab: usage by group with budgets, recent actions (admin; a client key: its own usage) ----------

async function refreshLab() {
  const [usage, audit] = await Promise.allSettled([
    api("GET", "/api/usage?since=30d&by=group"),
    api("GET", "/api/audit?since=7d&limit=20"),
  ]);
  renderUsage(usage);
  renderAudit(audit);
}

function labNote(result, cols) {
  const why = result.reason?.status === 403 ? "an admin key shows this" : result.reason?.message || "unavailable";
  return `<tr><td colspan="${cols}" class="muted">${esc(why)}</td></tr>`;
}

function renderUsage(result) {
  const el = byTestId("usage-body");
  if (result.status !== "fulfilled") { draw(el, labNote(result, 5)); return; }
  const budgets = new Map((result.value.budgets || []).map((b) => [b.group, b]));
  const rows = (result.value.rows || []).map((r) => {
    const b = budgets.get(r.name);
    const budget = b ? `<span class="${b.used_gpu_hours >= b.gpu_hours ? "over" : ""}">${b.used_gpu_hours.toFixed(2)} / `
      + `${b.gpu_hours} per ${esc(b.period)}</span>` : "";
    return `<tr data-testid="usage-${esc(r.name)}"><td>${esc(r.name)}</td><td>${r.requests}</td>`
      + `<td>${r.tokens_in} / ${r.tokens_out}${r.tokens_estimated ? " (est.)" : ""}</td>`
      + `<td>${r.gpu_hours.toFixed(3)}</td><td>${budget}</td></tr>`;
  });
  draw(el, rows.join("") || `<tr><td colspan="5" class="muted">no use recorded</td></tr>`);
}

function renderAudit(result) {
  const el = byTestId("audit-body");
  if (result.status !== "fulfilled") { draw(el, labNote(result, 5)); return; }
  const rows = (result.value.entries || []).slice().reverse().map((e) => {
    const models = (e.models || []).join(", ");
    const what = e.action === "evict" ? `${models} for ${e.model}` : e.model || models;  // victims, for what
    return `<tr data-testid="audit-row"><td>${fmtTime(e.at)}</td><td>${esc(e.who)}</td><td>${esc(e.action)}</td>`
      + `<td>${esc(what)}</td>`
      + `<td class="${e.result === "ok" ? "" : "over"}">${esc(e.result)}</td></tr>`;
  });
  draw(el, rows.join("") || `<tr><td colspan="5" class="muted">no action recorded</td></tr>`);
}

function labLoop() {
  refreshLab().catch((e) => console.error(e)).finally(() => setTimeout(labLoop, LAB_REFRESH_MS));
}

// ---------- wiring ----------

function init() {
  byTestId("models-body").addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr[data-model]");
    if (!tr) return;
    const button = ev.target.closest("button[data-action]");
    if (button?.dataset.worker) { actOn(tr.dataset.model, button.dataset.action, button.dataset.worker); return; }
    if (button) { act(tr.dataset.model, button.dataset.action); return; }
    if (ev.target.closest("a")) return;
    logView.open(tr.dataset.model);
  });
  byTestId("filter").addEventListener("input", renderModels);
  byTestId("stop-all").addEventListener("click", async () => {
    if (!confirm("Stop every running model on every host?")) return;
    try { toast((await api("POST", "/api/models/stop-all")).message || "all models stopped", "info"); }
    catch (e) { toast(`stop all: ${e.message}`); }
    refresh();
  });
  byTestId("log-clear").addEventListener("click", () => byTestId("log-view").replaceChildren());
  byTestId("log-close").addEventListener("click", () => {
    logView.close();
    byTestId("log-model").textContent = "select a model";
    renderModels();
  });
  const view = byTestId("log-view");
  view.addEventListener("scroll", () => {  // scrolling up pauses auto-scroll; back at the bottom resumes it
    const atBottom = view.scrollHeight - view.scrollTop - view.clientHeight < 24;
    byTestId("log-autoscroll").checked = atBottom;
  });
  loop();
  labLoop();
}

init();
