// llm-router dashboard: the timeline (GET /api/history, GET /api/events) drawn with uPlot
// (vendored under vendor/uplot/, pinned; nothing is fetched from outside the router).
// Per model: request rate, TTFT and latency p50/p95, tokens/s, queue wait p95, requests in flight
// and queued. The lab's GPUs (series gpus, summed by the routers once per slot): memory stacked by
// model, mean utilisation, power. One host at a time (chosen in tl-host): each GPU's memory stacked
// by model, and its GPUs' utilisation, power and temperature; a lab of 500 hosts costs one
// request for the lab and one per GPU of the chosen host, not one per GPU of the lab.
// The events of the cluster are vertical marks on every chart, on one time axis.
// Uses api(), esc(), byTestId() and fmtTime() of app.js (loaded first).
"use strict";

const TL_RANGES = {          // range -> [seconds shown, seconds per point]
  "15m": [900, 10], "1h": [3600, 10], "24h": [86400, 300], "7d": [7 * 86400, 1800], "30d": [30 * 86400, 7200],
};
const TL_REFRESH_MS = 10000;
const TL_COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777",
                   "#4b5563", "#65a30d"];
const TL_OTHER = "#9ca3af";  // memory no engine of the lab holds
const TL_EVENT_COLORS = {ready: "#16a34a", evicted: "#ea580c", crashed: "#dc2626", start_failed: "#dc2626",
                         reload_failed: "#dc2626", start_requested: "#2563eb", stopped: "#6b7280"};
const TL_GIB = 1 / 1024;
const TL_CHARTS = [          // testid, title, series kind, value of a point, unit scale; stacked: memory by model
  {id: "rate", title: "Requests / s", kind: "model", fields: [["rate", ""]], scale: 1},
  {id: "ttft", title: "TTFT p50 / p95 (ms)", kind: "model", fields: [["ttft_p50", " p50"], ["ttft_p95", " p95"]], scale: 1000},
  {id: "latency", title: "Latency p50 / p95 (ms)", kind: "model", fields: [["latency_p50", " p50"], ["latency_p95", " p95"]], scale: 1000},
  {id: "tokens", title: "Tokens / s (out)", kind: "model", fields: [["tokens_per_s", ""]], scale: 1},
  {id: "wait", title: "Queue wait p95 (ms)", kind: "model", fields: [["wait_p95", ""]], scale: 1000},
  {id: "inflight", title: "In flight / queued (all routers)", kind: "model", fields: [["inflight", ""], ["queued", " queued"]], scale: 1},
  {id: "lab-mem", title: "All GPUs: memory by model (GiB)", kind: "lab", stacked: true, scale: TL_GIB},
  {id: "lab-util", title: "All GPUs: mean utilisation (%)", kind: "lab", fields: [["utilization", ""]], scale: 1},
  {id: "lab-power", title: "All GPUs: power (kW)", kind: "lab", fields: [["power", ""]], scale: 1 / 1000},
  {id: "gpu-util", title: "GPU utilisation (%)", kind: "gpu", fields: [["utilization", ""]], scale: 1},
  {id: "gpu-power", title: "GPU power (W)", kind: "gpu", fields: [["power", ""]], scale: 1},
  {id: "gpu-temp", title: "GPU temperature (°C)", kind: "gpu", fields: [["temperature", ""]], scale: 1},
];

const timeline = {range: "1h", host: "", window: null, again: false, charts: new Map(), events: [], busy: false,
                  drawnAt: 0};

function tlWindow() {
  const [span, step] = TL_RANGES[timeline.range];
  const to = Math.floor(Date.now() / 1000);
  return {from: to - span, to, step};
}

// The hosts that have GPU series, and the chosen one's GPUs (the first host until one is chosen).
function tlHosts(names) {
  const gpus = new Map();
  for (const s of names.filter((n) => n.startsWith("gpu:"))) {
    const i = s.lastIndexOf(":");
    const host = s.slice(4, i);
    if (!gpus.has(host)) gpus.set(host, []);
    gpus.get(host).push(Number(s.slice(i + 1)));
  }
  const hosts = [...gpus.keys()].sort();
  if (!gpus.has(timeline.host)) timeline.host = hosts[0] || "";
  return {hosts, gpus: (gpus.get(timeline.host) || []).sort((a, b) => a - b)};
}

function tlHostPicker(hosts) {
  const pick = byTestId("tl-host");
  const want = hosts.join("\n");
  if (pick.dataset.hosts !== want) {
    pick.dataset.hosts = want;
    pick.innerHTML = hosts.map((h) => `<option value="${esc(h)}">${esc(h)}</option>`).join("")
      || `<option value="">no GPU recorded</option>`;
  }
  pick.value = timeline.host;
}

async function tlLoad() {
  const w = tlWindow();
  const listing = await api("GET", "/api/history");
  const names = listing.available || [];
  const models = names.filter((s) => s.startsWith("model:")).map((s) => s.slice(6));
  const {hosts, gpus} = tlHosts(names);
  const host = timeline.host;
  const q = (extra) => `/api/history?${new URLSearchParams({from: w.from, to: w.to, step: w.step, ...extra})}`;
  const [modelDocs, gpuDocs, lab, events] = await Promise.all([
    Promise.all(models.map((m) => api("GET", q({series: "model", model: m})))),
    Promise.all(gpus.map((g) => api("GET", q({series: "gpu", host, gpu: g})))),
    names.includes("gpus") ? api("GET", q({series: "gpus"})) : null,
    api("GET", `/api/events?${new URLSearchParams({from: w.from, to: w.to, limit: 2000})}`),
  ]);
  return {window: w, hosts, model: models.map((m, i) => ({label: m, doc: modelDocs[i]})),
          gpu: gpus.map((g, i) => ({label: `${host} GPU ${g}`, gpu: g, doc: gpuDocs[i]})),
          lab: lab ? [{label: "all GPUs", doc: lab}] : [], events: events.events || []};
}

// uPlot's columns: one x (seconds) shared by every series of a kind, values scaled, null = a gap.
function tlColumns(series, chart) {
  const xs = [...new Set(series.flatMap((s) => s.doc.points.map((p) => p.t)))].sort((a, b) => a - b);
  const cols = [xs];
  const labels = [];
  for (const s of series) {
    const byT = new Map(s.doc.points.map((p) => [p.t, p]));
    for (const [field, suffix] of chart.fields) {
      labels.push(`${s.label}${suffix}`);
      cols.push(xs.map((t) => { const v = byT.get(t)?.[field]; return v == null ? null : v * chart.scale; }));
    }
  }
  return {cols, labels};
}

// Memory stacked by model: each model's VRAM (vram:{model}) then "other" (no engine of the lab),
// as cumulative sums drawn top layer first (each fills down to 0 over the ones drawn before), the
// legend showing each layer's own value; the total memory as a dashed line.
function tlStack(doc, scale) {
  const xs = doc.points.map((p) => p.t);
  const layers = doc.fields.filter((f) => f.startsWith("vram:") || f === "other");
  if (!layers.length) layers.push("memory_used");
  const raw = layers.map((f) => doc.points.map((p) => (p[f] == null ? null : p[f] * scale)));
  const sums = [];
  let acc = xs.map(() => 0);
  for (const r of raw) {
    acc = acc.map((a, i) => (a == null || r[i] == null ? null : a + r[i]));
    sums.push(acc);
  }
  const names = layers.map((f) => (f.startsWith("vram:") ? f.slice(5) : f));
  const order = names.map((_, i) => names.length - 1 - i);  // top layer first
  return {
    cols: [xs, ...order.map((i) => sums[i]), doc.points.map((p) => (p.memory_total == null ? null : p.memory_total * scale))],
    labels: [...order.map((i) => names[i]), "total"],
    raw: [...order.map((i) => raw[i]), null],
  };
}

function tlColour(name) {
  if (name === "other" || name === "memory_used") return TL_OTHER;
  let h = 0;
  for (const c of name) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return TL_COLORS[h % TL_COLORS.length];
}

// Events as vertical lines on the plot; the one nearest the cursor is described below the charts.
function tlEventsPlugin() {
  return {hooks: {
    draw: [(u) => {
      const {ctx} = u;
      const {top, height} = u.bbox;
      ctx.save();
      for (const ev of timeline.events) {
        const x = Math.round(u.valToPos(ev.ts, "x", true));
        if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
        ctx.strokeStyle = TL_EVENT_COLORS[ev.kind] || "#9ca3af";
        ctx.lineWidth = ev.kind === "evicted" || ev.kind === "crashed" ? 2 : 1;
        ctx.setLineDash(ev.kind === "ready" || ev.kind === "evicted" || ev.kind === "crashed" ? [] : [4, 3]);
        ctx.beginPath();
        ctx.moveTo(x, top);
        ctx.lineTo(x, top + height);
        ctx.stroke();
      }
      ctx.restore();
    }],
    setCursor: [(u) => {
      if (u.cursor.left == null || u.cursor.left < 0) return;
      const t = u.posToVal(u.cursor.left, "x");
      const px = (u.bbox.width / devicePixelRatio) / Math.max(1, u.scales.x.max - u.scales.x.min);
      let best = null;
      for (const ev of timeline.events) {
        const d = Math.abs(ev.ts - t) * px;
        if (d < 6 && (!best || d < best.d)) best = {d, ev};
      }
      byTestId("tl-hover").textContent = best ? tlEventText(best.ev) : "";
    }],
  }};
}

function tlEventText(ev) {
  const bits = [fmtTime(ev.ts), ev.kind, ev.model, ev.host && `on ${ev.host}`, ev.key && `key ${ev.key}`,
                ev.models?.length && `evicted ${ev.models.join(", ")}`, ev.seconds && `${ev.seconds.toFixed(1)} s`,
                ev.detail];
  return bits.filter(Boolean).join(" · ");
}

// One uPlot chart in its box (created on first use); redrawn in place while its series stay the same.
function tlPlot(host, id, title, cols, labels, width, opts) {
  let box = byTestId(`tl-${id}`);
  if (!box) {
    box = document.createElement("div");
    box.className = "tl-chart";
    box.dataset.testid = `tl-${id}`;
    host.appendChild(box);
  }
  box.dataset.series = String(labels.length);
  box.dataset.points = String(cols.slice(1).reduce((n, c) => n + c.filter((v) => v != null).length, 0));
  box.dataset.labels = labels.join("|");
  const sig = `${title}|${labels.join("|")}@${width}`;
  const old = timeline.charts.get(id);
  if (old && old.sig === sig) {
    old.raw = opts.raw;
    old.plot.setData(cols);
    return;
  }
  if (old) old.plot.destroy();
  box.replaceChildren();
  const entry = {sig, raw: opts.raw, plot: null};
  const sparse = cols.slice(1).map((c) => c.filter((v) => v != null).length < 40);  // dots only where few
  entry.plot = new uPlot({
    title, width, height: 180, plugins: [tlEventsPlugin()],
    scales: {x: {time: true, range: () => [timeline.window.from, timeline.window.to]}},
    series: [{}, ...labels.map((label, i) => ({
      label, width: 1.5, points: {show: sparse[i], size: 4},  // a lone point between gaps shows too
      ...opts.series(label, i),
      // a stacked layer's legend shows its own value, not the running sum drawn
      ...(entry.raw && entry.raw[i] ? {value: (u, v, si, idx) => {
        const r = entry.raw?.[i]?.[idx];
        return r == null ? "--" : r.toFixed(1);
      }} : {}),
    }))],
    axes: [{}, {size: 64}],
    legend: {live: true},
  }, cols, box);
  timeline.charts.set(id, entry);
}

function tlDraw(data) {
  timeline.events = data.events;
  timeline.window = data.window;
  tlHostPicker(data.hosts);
  const host = byTestId("tl-charts");
  host.dataset.span = String(data.window.to - data.window.from);
  const width = Math.max(320, Math.floor((host.clientWidth - 24) / 2));
  const wanted = new Set();  // the charts of this draw, in their order on the page
  const stacked = (id, title, doc, scale) => {
    wanted.add(id);
    const {cols, labels, raw} = tlStack(doc, scale);
    tlPlot(host, id, title, cols, labels, width, {raw, series: (label) => label === "total"
      ? {stroke: "#111827", dash: [5, 4]}
      : {stroke: tlColour(label), fill: `${tlColour(label)}55`}});
  };
  for (const chart of TL_CHARTS) {
    if (chart.stacked) {
      if (data.lab.length) stacked(chart.id, chart.title, data.lab[0].doc, chart.scale);
      continue;
    }
    if (chart.id === "gpu-util") {  // the chosen host: each GPU's memory stacked by model, then its gauges
      for (const g of data.gpu) stacked(`gpu-mem-${g.gpu}`, `${g.label}: memory by model (GiB)`, g.doc, TL_GIB);
    }
    const series = data[chart.kind];
    if (!series.length && chart.kind !== "model") continue;
    wanted.add(chart.id);
    const {cols, labels} = tlColumns(series, chart);
    tlPlot(host, chart.id, chart.title, cols, labels, width, {raw: null, series: (label, i) => ({
      stroke: TL_COLORS[Math.floor(i / chart.fields.length) % TL_COLORS.length],
      dash: chart.fields.length > 1 && i % chart.fields.length ? [5, 4] : undefined,
    })});
  }
  for (const [id, c] of timeline.charts) {  // a GPU of the host shown before, or the lab's without data
    if (wanted.has(id)) continue;
    c.plot.destroy();
    byTestId(`tl-${id}`)?.remove();
    timeline.charts.delete(id);
  }
  for (const id of wanted) host.appendChild(byTestId(`tl-${id}`));  // another host's GPUs go in their place
  const list = byTestId("tl-events");
  const recent = data.events.slice(-50).reverse();
  draw(list, recent.map((ev) => `<li class="ev ev-${esc(ev.kind)}" title="${esc(JSON.stringify(ev))}">`
    + `${esc(tlEventText(ev))}</li>`).join("") || `<li class="muted">no events in this range</li>`);
  byTestId("tl-status").textContent = `${data.model.length} models · ${data.hosts.length} hosts · `
    + `${data.events.length} events · step ${data.window.step} s`;
  timeline.drawnAt = Date.now();
}

async function tlRefresh() {
  if (typeof uPlot === "undefined") return;
  if (timeline.busy) { timeline.again = true; return; }  // a range clicked mid-load: load again after
  timeline.busy = true;
  const started = performance.now();
  try {
    tlDraw(await tlLoad());
    byTestId("tl-charts").dataset.renderMs = String(Math.round(performance.now() - started));
  } catch (e) {
    byTestId("tl-status").textContent = `timeline: ${e.message}`;
  } finally {
    timeline.busy = false;
    if (timeline.again) { timeline.again = false; tlRefresh(); }
  }
}

function tlInit() {
  const ranges = byTestId("tl-ranges");
  ranges.innerHTML = Object.keys(TL_RANGES).map((r) =>
    `<button class="btn tiny${r === timeline.range ? " on" : ""}" data-range="${r}" data-testid="tl-range-${r}">${r}</button>`).join("");
  ranges.addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-range]");
    if (!b) return;
    timeline.range = b.dataset.range;
    for (const x of ranges.querySelectorAll("button")) x.classList.toggle("on", x === b);
    tlRefresh();
  });
  byTestId("tl-host").addEventListener("change", (ev) => { timeline.host = ev.target.value; tlRefresh(); });
  window.addEventListener("resize", () => { for (const c of timeline.charts.values()) c.sig = ""; tlRefresh(); });
  // /ui/#timeline: the timeline alone, full width (a wall display, a link in a report)
  const only = () => document.body.classList.toggle("timeline-only", location.hash === "#timeline");
  window.addEventListener("hashchange", () => { only(); for (const c of timeline.charts.values()) c.sig = ""; tlRefresh(); });
  only();
  const live = () => tlRefresh().finally(() => setTimeout(live, TL_REFRESH_MS));
  live();
}

tlInit();
