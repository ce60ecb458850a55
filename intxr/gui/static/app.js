// Interceptor live view. Plain JavaScript on canvases, fed by Server-Sent Events from `intxr gui`.
// State for tests and curious users: window.intxr.
"use strict";

const state = {
  series: new Map(),      // series key (the Splitter's series_name) -> {points: Map(frame -> point), counts, grid, label}
  order: [],              // series keys, newest first
  dropped: 0,             // older series the GUI no longer keeps
  selected: null,         // series shown
  userSelected: false,    // a tab was clicked: stop jumping to the newest series
  view: null,             // strip chart x range [lo, hi] when zoomed; null = all
  health: {}, splitter: {}, errors: [], gui: {},
  frameView: { series: null, frame: null, spots: 0, predicted: 0, predictedDrawn: 0, loaded: false, pinned: false },
  version: 0,
};
window.intxr = {
  state,
  points: () => { const s = current(); return s ? s.points.size : 0; },
  hits: () => { const s = current(); return s ? [...s.points.values()].filter(isHit).length : 0; },
  rasterCells: () => rasterCells.length,
  crystals: () => { const s = current(); return s && s.crystals ? s.crystals.map((k) => ({ ...k })) : []; },
  crystalsDrawn: () => crystalsDrawn,
  frameView: () => ({ ...state.frameView }),
  // The selected series' indexing as the server summed it up, and the lattice rows the table shows.
  indexing: () => { const s = current(); return s && s.indexing ? JSON.parse(JSON.stringify(s.indexing)) : null; },
  latticeRows: () => [...document.querySelectorAll("#lattices tbody tr")].map((tr) =>
    [...tr.children].map((td) => td.textContent)),
  tabs: () => [...document.querySelectorAll("#tabs button")].map((b) => b.textContent),
  // Page coordinates of a frame's raster cell (for clicking it from a test or a script).
  cellCenter: (frame) => {
    const cell = rasterCells.find((c) => c.frame === frame);
    if (!cell) return null;
    const rect = document.getElementById("raster").getBoundingClientRect();
    return { x: rect.left + cell.x + cell.size / 2, y: rect.top + cell.y + cell.size / 2 };
  },
};

const $ = (id) => document.getElementById(id);
const TABS = 8;  // newest series as tabs; older ones in the "older" list
// Everything shown comes from messages anyone on the host could publish: text, never markup.
const esc = (v) => String(v ?? "-").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const current = () => state.series.get(state.selected);
// A hit is the reader's word (decided with the processing section it used), and the counts are
// the server's: nothing here decides them again.
const isHit = (p) => p.hit === true;
let dirty = true;

// ---- data in --------------------------------------------------------------------------------

function apply(delta) {
  state.version = delta.version;
  for (const s of delta.series) {
    let series = state.series.get(s.key);
    if (!series) { series = { points: new Map(), grid: {} }; state.series.set(s.key, series); }
    for (const p of s.points) series.points.set(p.frame, p);
    series.counts = s.counts;
    series.label = s.label;
    series.number = s.series;
    if (s.grid) series.grid = s.grid;  // sent only when it changed
    if (s.crystals) series.crystals = s.crystals;  // the Collector's, once a raster series is summed up
    if (s.indexing) series.indexing = s.indexing;  // sent only when the series changed
  }
  state.order = delta.series.map((s) => s.key);
  for (const key of [...state.series.keys()]) if (!state.order.includes(key)) state.series.delete(key);
  state.dropped = delta.series_dropped || 0;
  state.gui = delta.gui || {};
  if (!state.userSelected || !state.series.has(state.selected)) state.selected = state.order[0] ?? null;
  state.health = delta.health || {};
  state.splitter = delta.splitter || {};
  state.errors = delta.errors || [];
  dirty = true;
}

function connect() {
  const source = new EventSource(`/events?since=${state.version}`);
  source.onopen = () => { $("status").textContent = "live"; };
  source.onmessage = (event) => {
    try { apply(JSON.parse(event.data)); } catch (e) { console.error("intxr: update not applied", e); }
  };
  source.onerror = () => { $("status").textContent = "reconnecting..."; };
}

// ---- drawing --------------------------------------------------------------------------------

function fitCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
    canvas.width = Math.round(w * ratio); canvas.height = Math.round(h * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  return [ctx, w, h];
}

const fmt = (v, digits = 2) => (v === null || v === undefined ? "-" : typeof v === "number" ? v.toFixed(digits) : v);

function selectSeries(key) {
  state.selected = key; state.userSelected = key !== state.order[0]; state.view = null; dirty = true;
}

function drawTabs() {
  const tabs = $("tabs");
  const shown = state.order.slice(0, TABS), older = state.order.slice(TABS);
  const wanted = shown.join(",") + "|" + older.join(",") + "|" + state.dropped;
  if (tabs.dataset.order !== wanted) {
    tabs.dataset.order = wanted;
    tabs.innerHTML = "";
    for (const key of shown) {
      const b = document.createElement("button");
      b.dataset.key = key;
      b.title = key;
      b.onclick = () => selectSeries(key);
      tabs.appendChild(b);
    }
    if (older.length || state.dropped) {
      const list = document.createElement("select");
      list.id = "older";
      const head = document.createElement("option");
      head.value = "";
      head.textContent = `older series (${older.length})` + (state.dropped ? `, ${state.dropped} no longer kept` : "");
      list.appendChild(head);
      for (const key of older) {
        const o = document.createElement("option");
        o.value = key;
        o.textContent = `series ${(state.series.get(key) || {}).label ?? key}`;
        list.appendChild(o);
      }
      list.onchange = () => { if (list.value) selectSeries(list.value); };
      tabs.appendChild(list);
    }
  }
  for (const b of tabs.querySelectorAll("button")) {
    const s = state.series.get(b.dataset.key);
    const c = (s && s.counts) || {};
    b.textContent = `series ${s ? s.label : b.dataset.key} (${c.hits ?? 0} hits / ${c.results ?? 0})${c.ended ? "" : " live"}`;
    b.classList.toggle("active", b.dataset.key === state.selected);
  }
  const list = $("older");
  if (list) list.value = older.includes(state.selected) ? state.selected : "";
}

function drawCounts() {
  const s = current();
  const c = (s && s.counts) || {};
  $("seriesNo").textContent = s ? s.label : "-";
  const cells = [
    ["hits", c.hits], ["hit rate", c.hit_rate !== undefined ? `${(100 * c.hit_rate).toFixed(0)}%` : "-"],
    ["median hres (A)", fmt(c.median_hres)], ["frames/s", fmt(c.rate, 1)],
    ["received", c.received ?? "-"], ["written", c.written ?? "-"], ["processed", c.processed ?? 0],
    ["blank", c.blank ?? 0], ["skipped", c.skipped ?? "-"], ["failed", c.failed ?? 0],
    ["lost (no result)", c.lost ?? "-"], ["latency p50 (s)", fmt(c.latency_p50, 3)], ["results", c.results ?? 0],
  ];
  // The Collector's SERIES summary names the frames (ranges, as text).
  if (c.lost_ranges) cells.push(["lost frames", c.lost_ranges]);
  if (c.skipped_ranges) cells.push(["skipped frames", c.skipped_ranges]);
  $("counts").innerHTML = cells.map(([k, v]) => `<div>${k}<span>${esc(v)}</span></div>`).join("");
}

function drawIndexing() {
  const s = current();
  const ix = (s && s.indexing) || null;
  const pct = (v) => (v === null || v === undefined ? "-" : `${(100 * v).toFixed(0)}%`);
  const cells = [["indexed", ix ? ix.indexed : "-"], ["of hits", pct(ix && ix.rate_of_hits)],
    ["of frames", pct(ix && ix.rate_of_frames)], ["tried", ix ? ix.tried : "-"]];
  $("indexCounts").innerHTML = cells.map(([k, v]) => `<div>${k}<span>${esc(v)}</span></div>`).join("");
  const rows = ix ? ix.lattices : [];
  const cell = (r, i) => (r.cell ? `${esc(fmt(r.cell[i]))} &plusmn; ${esc(fmt(r.cell_spread[i]))}` : "-");
  let html = rows.map((r) =>
    `<tr><td>${esc(r.lattice)}</td><td>${esc(r.space_group)}</td><td>${esc(r.frames)}</td>` +
    `<td><span class="bar" style="width:${Math.round(40 * r.fraction)}px"></span> ${esc(pct(r.fraction))}</td>` +
    [0, 1, 2, 3, 4, 5].map((i) => `<td>${cell(r, i)}</td>`).join("") + "</tr>").join("");
  if (ix && ix.other) html += `<tr><td>other</td><td></td><td>${esc(ix.other)}</td><td colspan="7"></td></tr>`;
  $("lattices").querySelector("tbody").innerHTML = html;
}

function stripRange(points) {
  if (!points.length) return [0, 1];
  let lo = Infinity, hi = -Infinity;
  for (const p of points) { lo = Math.min(lo, p.frame); hi = Math.max(hi, p.frame); }
  if ($("follow").checked && state.view) {
    const width = state.view[1] - state.view[0];
    return [hi - width, hi + width * 0.02];
  }
  return state.view || [lo - 0.5, hi + 0.5];
}

function drawStrip() {
  const canvas = $("strip");
  const [ctx, w, h] = fitCanvas(canvas);
  ctx.clearRect(0, 0, w, h);
  const s = current();
  const points = s ? [...s.points.values()] : [];
  const pad = { l: 44, r: 44, t: 8, b: 22 };
  const [x0, x1] = stripRange(points);
  const maxSpots = Math.max(...points.map((p) => p.n_spots || 0), 1);
  const hresVals = points.map((p) => p.hres).filter((v) => v && v > 0 && v < 99);
  const maxHres = Math.max(5, ...hresVals);
  const X = (f) => pad.l + ((f - x0) / (x1 - x0 || 1)) * (w - pad.l - pad.r);
  const Y = (n) => h - pad.b - (n / maxSpots) * (h - pad.t - pad.b);
  const YH = (d) => pad.t + (d / maxHres) * (h - pad.t - pad.b);  // resolution: better (smaller) is higher
  ctx.strokeStyle = "#888"; ctx.fillStyle = "#444"; ctx.lineWidth = 1; ctx.font = "11px system-ui";
  ctx.strokeRect(pad.l, pad.t, w - pad.l - pad.r, h - pad.t - pad.b);
  for (let k = 0; k <= 4; k++) {
    const n = (maxSpots * k) / 4;
    ctx.fillText(n.toFixed(0), 4, Y(n) + 4);
    ctx.fillText(((maxHres * k) / 4).toFixed(1), w - pad.r + 4, YH((maxHres * k) / 4) + 4);
  }
  ctx.fillText(`frame ${Math.round(x0)} - ${Math.round(x1)}`, pad.l, h - 6);
  ctx.save();
  ctx.beginPath(); ctx.rect(pad.l, pad.t, w - pad.l - pad.r, h - pad.t - pad.b); ctx.clip();
  let drawn = 0;
  for (const p of points) {
    if (p.frame < x0 || p.frame > x1) continue;
    ctx.fillStyle = isHit(p) ? "#1a9850" : "#999";
    ctx.beginPath(); ctx.arc(X(p.frame), Y(p.n_spots || 0), 3, 0, 2 * Math.PI); ctx.fill();
    if (p.indexed === true) {
      ctx.strokeStyle = "#1f3a5f"; ctx.beginPath(); ctx.arc(X(p.frame), Y(p.n_spots || 0), 5, 0, 2 * Math.PI); ctx.stroke();
    }
    if (p.hres && p.hres > 0 && p.hres < 99) {
      ctx.fillStyle = "#d95f02"; ctx.fillRect(X(p.frame) - 2, YH(p.hres) - 2, 4, 4);
    }
    drawn++;
  }
  ctx.restore();
  canvas.dataset.points = drawn;
}

let rasterCells = [];
let crystalsDrawn = 0;
function drawRaster() {
  const canvas = $("raster");
  const [ctx, w, h] = fitCanvas(canvas);
  ctx.clearRect(0, 0, w, h);
  rasterCells = [];
  crystalsDrawn = 0;
  const s = current();
  const grid = (s && s.grid) || {};
  const frames = Object.keys(grid);
  if (!frames.length) {
    $("rasterNote").textContent = "no grid positions (mapping header key or raster_row_length)";
    return;
  }
  let rows = 0, cols = 0;
  for (const f of frames) { rows = Math.max(rows, grid[f][0] + 1); cols = Math.max(cols, grid[f][1] + 1); }
  $("rasterNote").textContent = `${rows} x ${cols}; click a cell for its frame`;
  const by = $("rasterBy").value;
  const values = frames.map((f) => (s.points.get(Number(f)) || {})[by] || 0);
  const vmax = Math.max(1, ...values);
  const cell = Math.min((w - 2) / cols, (h - 2) / rows);
  frames.forEach((f, k) => {
    const [r, c] = grid[f];
    const v = Math.max(0, values[k]) / vmax;
    // white -> dark blue: where the crystal is stands out
    ctx.fillStyle = `rgb(${Math.round(255 - 225 * v)}, ${Math.round(255 - 180 * v)}, ${Math.round(255 - 80 * v)})`;
    const x = 1 + c * cell, y = 1 + r * cell;
    ctx.fillRect(x, y, cell - 1, cell - 1);
    ctx.strokeStyle = "#d0d4da"; ctx.lineWidth = 1; ctx.strokeRect(x + 0.5, y + 0.5, cell - 2, cell - 2);
    if (state.frameView.series === state.selected && state.frameView.frame === Number(f)) {
      ctx.strokeStyle = "#d95f02"; ctx.lineWidth = 2; ctx.strokeRect(x + 1, y + 1, cell - 3, cell - 3);
    }
    rasterCells.push({ frame: Number(f), x, y, size: cell - 1 });
  });
  // The crystals the Collector found (strongest first): box outlined, centre of mass marked, numbered.
  (s.crystals || []).forEach((k, i) => {
    const x = 1 + k.left * cell, y = 1 + k.top * cell;
    ctx.strokeStyle = "#e7298a"; ctx.lineWidth = 2; ctx.setLineDash([4, 2]);
    ctx.strokeRect(x, y, k.width * cell - 1, k.height * cell - 1);
    ctx.setLineDash([]);
    const cx = 1 + (k.x + 0.5) * cell, cy = 1 + (k.y + 0.5) * cell;
    ctx.beginPath(); ctx.moveTo(cx - 4, cy); ctx.lineTo(cx + 4, cy); ctx.moveTo(cx, cy - 4); ctx.lineTo(cx, cy + 4);
    ctx.stroke();
    ctx.fillStyle = "#e7298a"; ctx.font = "11px sans-serif"; ctx.fillText(String(i + 1), x + 2, y + 11);
    crystalsDrawn += 1;
  });
  if (s.crystals) $("rasterNote").textContent += `; ${s.crystals.length} crystal(s) found`;
}

function drawHealth() {
  const h = state.health || {};
  const ranks = (Array.isArray(h.ranks) ? h.ranks : []).filter((r) => r.rank > 0);
  // The Collector's rank fields: dead (replaced unless given_up), lost (silent), starting (a replacement).
  const stateOf = (r) => (r.dead ? (r.given_up ? "DEAD, not replaced" : "DEAD") : r.lost ? "LOST"
    : r.starting ? "starting" : "ok") + (r.restarts ? ` (replaced ${r.restarts}x)` : "");
  $("ranks").querySelector("tbody").innerHTML = ranks.map((r) =>
    `<tr><td>${esc(r.rank)}</td><td>${esc(r.host)}</td><td>${esc(r.cpu)}</td><td>${esc(r.numa)}</td>` +
    `<td>${esc(r.buffer_numa)}</td>` +
    `<td>${esc(r.frames ?? r.results ?? 0)}</td><td>${esc(fmt(r.rate, 1))}</td>` +
    `<td class="${r.lost || r.dead ? "lost" : ""}">${esc(stateOf(r))}</td></tr>`).join("");
  // The job's state, when the Collector says it: no readers is the loud one.
  const alive = typeof h.readers_alive === "number" ? h.readers_alive
    : ranks.length ? ranks.filter((r) => !r.lost && !r.dead && !r.starting).length : null;
  const noReaders = h.no_readers === true || alive === 0;
  const banner = $("jobState");
  const since = typeof h.no_readers_for === "number" && h.no_readers_for > 0 ? ` for ${h.no_readers_for.toFixed(0)} s` : "";
  banner.textContent = noReaders ? `NO READERS${since}: frames are written but not processed` : "";
  banner.hidden = !noReaders;
  const sp = state.splitter || {};
  const fill = sp.buffer_bytes ? `${((100 * (sp.queued_bytes || 0)) / sp.buffer_bytes).toFixed(1)}%` : "-";
  const g = state.gui || {};
  // Names as the Collector's health and the Splitter's counters send them; the Collector's only when sent.
  const job = [["readers alive", alive], ["reader restarts", h.reader_restarts], ["job restarts", h.job_restarts],
    ["bad results", h.malformed_results], ["results of another version", h.other_version_results],
    ["bad Splitter messages", h.malformed_splitter],
    ["late results", h.late_results], ["results of unknown series", h.unknown_series],
    ["UI lines dropped", h.ui_dropped]].filter(([, v]) => v !== undefined && v !== null);
  const cells = [...job,
    ["splitter received", sp.frames_received], ["written", sp.frames_written],
    ["not written", sp.frames_not_written], ["forwarded", sp.frames_forwarded], ["skipped", sp.frames_skipped],
    ["malformed", sp.malformed], ["disk full", sp.disk_full], ["buffer fill", fill],
    ["readers waiting", sp.readers_waiting], ["GUI bad messages", g.bad_messages]];
  $("splitter").innerHTML = cells.map(([k, v]) => `<div>${esc(k)}<span>${esc(v ?? "-")}</span></div>`).join("");
  const errors = [...(state.errors || [])];
  if (g.bad_messages) errors.push(`gui: ${g.bad_messages} bad messages ignored (last: ${g.last_bad})`);
  $("errors").textContent = errors.join("\n");
}

// ---- frame view -----------------------------------------------------------------------------

let frameRequest = null;
let frameInfo = null;  // what the overlay shows, kept to redraw it (the predicted spots toggled)
function showFrame(series, frame, pinned) {
  if (state.frameView.series === series && state.frameView.frame === frame) return;
  state.frameView = { series, frame, spots: 0, predicted: 0, predictedDrawn: 0, loaded: false, pinned };
  $("frameCrystal").textContent = "";
  const label = (state.series.get(series) || {}).label ?? series;
  $("frameTitle").textContent = `series ${label} frame ${frame}${pinned ? "" : " (latest hit)"}`;
  const query = new URLSearchParams({ series, frame });
  const request = (frameRequest = fetch(`/api/frame?${query}`).then((r) => r.json()));
  request.then((info) => {
    if (request !== frameRequest) return;
    if (info.error) { $("frameTitle").textContent += ` - ${info.error}`; state.frameView.frame = null; return; }
    const img = $("frameImg");
    img.onload = () => {
      frameInfo = info;
      drawOverlay(info);
      state.frameView.loaded = true; state.frameView.spots = info.spots.length;
      state.frameView.predicted = info.predicted.length;
    };
    const c = info.indexing;
    $("frameCrystal").textContent = c
      ? `indexed ${c.lattice} ${c.space_group} ${c.unit_cell.map((v) => fmt(v)).join(" ")}, ${c.n_indexed ?? "-"} spots, ` +
        `rmsd ${fmt(c.rmsd_px)} px; ${info.predicted.length} predicted` + (info.predicted_note ? ` (${info.predicted_note})` : "")
      : `not indexed${info.predicted_note && info.predicted_note !== "not indexed" ? ` (${info.predicted_note})` : ""}`;
    img.src = info.png;
  });
}

function drawOverlay(info) {
  const canvas = $("frameOverlay");
  const [ctx, w] = fitCanvas(canvas);
  const k = w / info.width;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.lineWidth = 1.2; ctx.font = "11px system-ui";
  for (const ring of info.rings) {
    ctx.strokeStyle = ring.ice ? "rgba(0,120,255,0.55)" : "rgba(217,95,2,0.8)";
    ctx.setLineDash(ring.ice ? [3, 3] : []);
    ctx.beginPath(); ctx.arc(info.beam[0] * k, info.beam[1] * k, ring.radius * k, 0, 2 * Math.PI); ctx.stroke();
    if (!ring.ice) {
      ctx.fillStyle = "rgba(217,95,2,0.95)";
      ctx.fillText(`${ring.d.toFixed(1)} A`, info.beam[0] * k + 3, info.beam[1] * k - ring.radius * k - 2);
    }
  }
  ctx.setLineDash([]);
  ctx.strokeStyle = "#e7298a";
  for (const [x, y] of info.spots) {
    ctx.beginPath(); ctx.arc(x * k, y * k, 5, 0, 2 * Math.PI); ctx.stroke();
  }
  // Predicted spots of the indexed lattice: small squares, apart from the found spots' circles.
  let drawn = 0;
  if ($("showPredicted").checked) {
    // Thousands reach the detector's edge: small and thin, so the frame and the found spots stay visible.
    ctx.strokeStyle = "rgba(0,166,166,0.9)"; ctx.lineWidth = 1;
    ctx.beginPath();
    for (const [x, y] of info.predicted) { ctx.rect(x * k - 1.5, y * k - 1.5, 3, 3); drawn++; }
    ctx.stroke();
  }
  state.frameView.predictedDrawn = drawn;
}

function latestHit() {
  const s = current();
  if (!s) return null;
  let best = null;
  for (const p of s.points.values()) if (isHit(p) && (!best || p.frame > best.frame)) best = p;
  return best;
}

// ---- interaction ----------------------------------------------------------------------------

function setupInteraction() {
  $("rasterBy").onchange = () => { dirty = true; };
  $("follow").onchange = () => { dirty = true; };
  $("showPredicted").onchange = () => { if (frameInfo && state.frameView.loaded) drawOverlay(frameInfo); };
  $("resetZoom").onclick = () => { state.view = null; dirty = true; };
  const strip = $("strip");
  strip.addEventListener("wheel", (e) => {
    e.preventDefault();
    const s = current(); if (!s) return;
    const [x0, x1] = stripRange([...s.points.values()]);
    const rect = strip.getBoundingClientRect();
    const at = x0 + ((e.clientX - rect.left - 44) / (rect.width - 88)) * (x1 - x0);
    const f = e.deltaY < 0 ? 0.8 : 1.25;
    state.view = [at - (at - x0) * f, at + (x1 - at) * f];
    dirty = true;
  }, { passive: false });
  let drag = null;
  strip.addEventListener("mousedown", (e) => {
    const s = current(); if (!s) return;
    drag = { x: e.clientX, range: stripRange([...s.points.values()]) };
    $("follow").checked = false;
  });
  window.addEventListener("mouseup", () => { drag = null; });
  window.addEventListener("mousemove", (e) => {
    if (!drag) return;
    const rect = strip.getBoundingClientRect();
    const per = (drag.range[1] - drag.range[0]) / (rect.width - 88);
    const shift = (drag.x - e.clientX) * per;
    state.view = [drag.range[0] + shift, drag.range[1] + shift];
    dirty = true;
  });
  $("raster").addEventListener("click", (e) => {
    const rect = $("raster").getBoundingClientRect();
    const x = e.clientX - rect.left, y = e.clientY - rect.top;
    const cell = rasterCells.find((c) => x >= c.x && x <= c.x + c.size && y >= c.y && y <= c.y + c.size);
    if (cell) { showFrame(state.selected, cell.frame, true); dirty = true; }
  });
  window.addEventListener("resize", () => { dirty = true; });
}

function frame() {
  requestAnimationFrame(frame);  // first: a drawing error must not stop the live view
  if (dirty) {
    dirty = false;
    for (const draw of [drawTabs, drawCounts, drawIndexing, drawStrip, drawRaster, drawHealth]) {
      try { draw(); } catch (e) { console.error(`intxr: ${draw.name}`, e); }
    }
    if (!state.frameView.pinned || state.frameView.series !== state.selected) {
      const hit = latestHit();
      if (hit) showFrame(state.selected, hit.frame, false);
    }
  }
}

setupInteraction();
connect();
requestAnimationFrame(frame);
