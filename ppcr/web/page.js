// The ppcr page: one image, several phrases, an answer per phrase: none, one or several objects, each in
// its own colour. Plain JS, no build step, nothing loaded from elsewhere. The masks arrive as COCO RLE
// and are decoded here.
"use strict";

// Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour-vision deficiency.
const PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"];
const NO_MATCH = "#8a8f98";  // the card of an answer without any object
const $ = (id) => document.getElementById(id);

const state = {
  model: null,       // /healthz's "model" (or null when the server did not answer)
  limits: null,
  image: null,       // {blob, name, kind: "synthetic"|"photo"|"upload", img, w, h, url}
  answers: [],       // the answers shown now: one per phrase, each with its objects (`instances`)
  highlight: null,   // {answer, instance} indices: the object the pointer or focus is on
  pinned: null,      // the same, fixed by a click (a second click releases it)
  history: [],       // [{image, answers, when}]
  busy: false,
};

// ------------------------------------------------------------------------------------------------
// COCO compressed RLE (pycocotools rleFrString): counts of alternating 0/1 runs, column-major.

function decodeCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

function decodeRle(rle) {  // -> Uint8Array, row-major, length h*w
  const [h, w] = rle.size, counts = decodeCounts(rle.counts);
  const mask = new Uint8Array(h * w);
  let i = 0, v = 0;
  for (const n of counts) {
    if (v) for (let j = i; j < i + n; j++) mask[(j % h) * w + Math.floor(j / h)] = 1;
    i += n; v = 1 - v;
  }
  return mask;
}

// ------------------------------------------------------------------------------------------------
// Messages

function say(text) { $("status").textContent = text; }

function setState(name) { document.body.dataset.state = name; }

function showError(kind, text) {
  const box = $("error");
  box.hidden = false;
  box.dataset.kind = kind;
  box.textContent = text;
  setState("error");
  // No stale overlay under an error: the answers it showed are in the history.
  state.answers = [];
  state.highlight = state.pinned = null;
  renderCards();
  draw();
  say("");
}

function clearError() { $("error").hidden = true; $("error").textContent = ""; delete $("error").dataset.kind; }

/** A failed fetch or answer -> one sentence for a person: network, a non-JSON answer, or the server's JSON error. */
async function describeFailure(response) {
  const text = await response.text();
  let message = null;
  try { message = JSON.parse(text).error; } catch (_) { /* not JSON: a proxy's or Serve's own answer */ }
  const status = response.status;
  if (message) {
    if (status === 422 || status === 413 || status === 400 || status === 415)
      return ["server-json", `The server could not use this request (${status}): ${message}`];
    if (status === 503) return ["server-json", `The server is busy (${status}): ${message}`];
    if (status === 504) return ["server-json", `The model took too long (${status}): ${message}`];
    return ["server-json", `The server failed (${status}): ${message}`];
  }
  const first = text.trim().split("\n")[0].slice(0, 200);
  if (status === 503)
    return ["server-text", `The server is overloaded or starting (503)${first ? ": " + first : ""}. Try again in a few seconds.`];
  return ["server-text", `The server answered ${status} ${response.statusText}${first ? ": " + first : ""}`];
}

const NETWORK = "Cannot reach the server: it may have stopped, or the network is down. Is `ppcr serve` still running?";

// ------------------------------------------------------------------------------------------------
// The model banner

function fmt(v) { return typeof v === "number" ? (Math.abs(v) <= 1 ? v.toFixed(3) : String(v)) : String(v); }

function describeModel(m) {
  const parts = [`preset <b>${esc(m.preset)}</b>`];
  if (m.checkpoint) parts.push(`checkpoint <code>${esc(m.checkpoint)}</code>`);
  const t = m.trained_on;
  if (t) {
    const what = t.what || [t.dataset, t.split_by].filter(Boolean).join("/");
    const steps = t.steps ? ` (${t.steps} steps)` : "";
    parts.push(`trained on ${esc(what)}${steps}`);
  }
  if (m.evaluation) {
    const evals = Object.entries(m.evaluation).slice(0, 3).map(([split, nums]) =>
      `${esc(split)}: ` + Object.entries(nums).map(([k, v]) => `${esc(k)} ${fmt(v)}`).join(", "));
    if (evals.length) parts.push(evals.join("; "));
  }
  // Said, not left out: a checkpoint without meta.json may be anything from untrained to final.
  if (!t && !m.evaluation) parts.push("no training record or evaluation numbers in the checkpoint (meta.json)");
  else if (!m.evaluation) parts.push("no evaluation numbers recorded");
  return parts.join(" · ");
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

async function loadHealth() {
  const banner = $("banner");
  try {
    const r = await fetch("/healthz");
    const body = await r.json();
    state.model = body.model || null;
    state.limits = body.limits || null;
    const m = state.model || {};
    const down = Object.entries(body.deployments || {}).filter(([, d]) => !d.up).map(([n]) => n);
    if (m.random_weights) {
      banner.className = "banner loud";
      banner.dataset.kind = "random";
      banner.innerHTML = "RANDOM WEIGHTS: this server runs an untrained model (no checkpoint), so every mask is " +
        "meaningless. <span class='detail'>For checking the plumbing only: start it with <code>--checkpoint DIR</code>.</span>";
    } else {
      banner.className = m.warning ? "banner warn" : "banner";
      banner.dataset.kind = m.toy ? "toy" : "model";
      banner.innerHTML = "Model: " + describeModel(m) + (m.warning ? `<br><span class="detail">Note: ${esc(m.warning)}.</span>` : "");
    }
    if (down.length) banner.innerHTML += `<br><b>Not ready yet: ${esc(down.join(", "))}</b> (starting or failed; see /healthz).`;
  } catch (e) {
    banner.className = "banner loud";
    banner.dataset.kind = "unknown";
    banner.textContent = "The server did not say which model answers (/healthz failed): " + NETWORK;
  }
  updateToyBanner();
}

function updateToyBanner() {
  const b = $("toy-banner"), m = state.model;
  const show = m && m.toy && !m.random_weights && state.image && state.image.kind !== "synthetic";
  b.hidden = !show;
  b.textContent = show ? "This is a toy model: it knows only the synthetic coloured shapes it was trained on. " +
    "On this image its masks are noise, however confident they look." : "";
}

// ------------------------------------------------------------------------------------------------
// Image input: file picker, drag and drop, paste, gallery

async function setImage(blob, name, kind) {
  const url = URL.createObjectURL(blob);
  const img = new Image();
  img.src = url;
  try {
    await img.decode();
  } catch (e) {
    URL.revokeObjectURL(url);
    showError("input", `${name} is not an image this browser can show (${blob.type || "unknown type"}).`);
    return;
  }
  state.image = {blob, name, kind, img, w: img.naturalWidth, h: img.naturalHeight, url};
  state.answers = [];
  state.highlight = state.pinned = null;
  clearError();
  setState("idle");
  $("image-name").textContent = `${name} · ${img.naturalWidth}×${img.naturalHeight}`;
  for (const b of document.querySelectorAll("#gallery button")) b.setAttribute("aria-pressed", String(b.dataset.name === name));
  renderCards();
  draw();
  updateToyBanner();
  say(`Image loaded: ${name}, ${img.naturalWidth}×${img.naturalHeight}. Type phrases and press Segment.`);
}

function firstImage(items) {
  for (const item of items || []) {
    if (item.kind === "file" && item.type.startsWith("image/")) return item.getAsFile();
  }
  return null;
}

function wireInputs() {
  $("file").addEventListener("change", () => {
    const f = $("file").files[0];
    if (f) setImage(f, f.name, "upload");
  });
  for (const zone of [$("drop"), $("stage")]) {
    zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (ev) => {
      ev.preventDefault();
      zone.classList.remove("over");
      const f = firstImage(ev.dataTransfer.items) || ev.dataTransfer.files[0];
      if (f) setImage(f, f.name || "dropped image", "upload");
      else showError("input", "That was not an image file.");
    });
  }
  document.addEventListener("paste", (ev) => {
    const f = firstImage(ev.clipboardData && ev.clipboardData.items);
    if (f) { ev.preventDefault(); setImage(f, "pasted image", "upload"); }
  });
}

async function loadGallery() {
  const list = $("gallery"), note = $("gallery-note");
  let cat;
  try {
    cat = await (await fetch("/examples")).json();
  } catch (e) {
    note.textContent = "The examples could not be loaded.";
    return;
  }
  for (const ex of cat.examples) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.name = ex.name;
    b.dataset.kind = ex.kind;
    b.setAttribute("aria-pressed", "false");
    b.setAttribute("aria-label", `${ex.title}; try: ${ex.phrases.join(", ")}`);
    b.innerHTML = `<img src="${esc(ex.url)}" alt="" loading="lazy"><span>${esc(ex.kind === "photo" ? ex.name : ex.name.replace("-", " "))}</span>`;
    b.addEventListener("click", async () => {
      const blob = await (await fetch(ex.url)).blob();
      $("phrases").value = ex.phrases.join("\n");
      await setImage(blob, ex.name, ex.kind);
    });
    li.appendChild(b);
    list.appendChild(li);
  }
  note.textContent = cat.photos === "available"
    ? "Synthetic scenes are what the demo model was trained on; the photographs (scikit-image) show what a toy model cannot do."
    : `Synthetic scenes only. For photographs: ${cat.photos}, then restart the server.`;
}

// ------------------------------------------------------------------------------------------------
// Asking the server

function phrases() {
  return $("phrases").value.split("\n").map((s) => s.trim()).filter(Boolean);
}

async function segment() {
  if (state.busy) return;
  clearError();
  if (!state.image) { showError("input", "Choose an image first (drop, paste, pick a file or an example)."); return; }
  const texts = phrases();
  if (!texts.length) { showError("input", "Type at least one phrase, e.g. “the red circle”."); $("phrases").focus(); return; }
  const max = state.limits ? state.limits.max_expressions : 16;
  if (texts.length > max) { showError("input", `${texts.length} phrases: this server takes at most ${max} at once.`); return; }
  const body = new FormData();
  body.append("image", state.image.blob, state.image.name);
  for (const t of texts) body.append("expression", t);
  state.busy = true;
  setState("busy");
  $("go").disabled = true;
  $("spinner").hidden = false;
  $("stage").setAttribute("aria-busy", "true");
  say(`Segmenting ${texts.length} phrase${texts.length > 1 ? "s" : ""}…`);
  try {
    let response;
    try {
      response = await fetch("/v1/segment", {method: "POST", body});
    } catch (e) {
      showError("network", NETWORK);
      return;
    }
    if (!response.ok) {
      const [kind, text] = await describeFailure(response);
      showError(kind, text);
      return;
    }
    let answer;
    try { answer = await response.json(); } catch (e) {
      showError("server-text", "The server's answer was not JSON; is this a ppcr server?");
      return;
    }
    const results = answer.results || [answer];
    const ms = answer.timings_ms ? answer.timings_ms.total : null;
    state.answers = makeAnswers(texts, results, ms, answer.timings_ms);
    state.highlight = state.pinned = null;
    state.history.unshift({image: state.image, answers: state.answers, when: new Date()});
    state.history = state.history.slice(0, 20);
    renderCards();
    renderHistory();
    draw();
    setState("done");
    if (window.matchMedia("(max-width: 860px)").matches) $("status").scrollIntoView({block: "start"});
    say(`${state.answers.length} answer${state.answers.length > 1 ? "s" : ""} in ${ms} ms: ` +
      state.answers.map(summary).join("; ") + ".");
  } finally {
    state.busy = false;
    $("go").disabled = false;
    $("spinner").hidden = true;
    $("stage").removeAttribute("aria-busy");
  }
}

function countPixels(bits) {
  let n = 0;
  for (let k = 0; k < bits.length; k++) n += bits[k];
  return n;
}

/** The server's answers -> the page's: per phrase its union and its objects, each object the next colour
 *  of the palette (an answer with one object keeps the colour its phrase had before several existed). */
function makeAnswers(texts, results, ms, timings) {
  let next = 0;
  return results.map((r, i) => {
    const bits = decodeRle(r.mask);
    const instances = r.instances.map((o) => {
      const own = o.mask.counts === r.mask.counts ? bits : decodeRle(o.mask);
      return {box: o.box, score: o.score, mask: o.mask, bits: own, pixels: countPixels(own),
              color: PALETTE[next++ % PALETTE.length], layers: null};
    });
    return {phrase: texts[i], noTarget: Boolean(r.no_target), box: r.box, score: r.score, mask: r.mask, bits,
            pixels: countPixels(bits), instances, ms, timings, visible: true,
            color: instances.length ? instances[0].color : NO_MATCH};
  });
}

/** One phrase's answer in words (the live announcement, the canvas's label). */
function summary(a) {
  if (a.noTarget) return `${a.phrase}: no match`;
  if (a.instances.length === 1) return `${a.phrase} (score ${a.score.toFixed(2)})`;
  return `${a.phrase}: ${a.instances.length} objects (scores ${a.instances.map((o) => o.score.toFixed(2)).join(", ")})`;
}

// ------------------------------------------------------------------------------------------------
// Drawing

function hexRgb(hex) { const n = parseInt(hex.slice(1), 16); return [n >> 16, (n >> 8) & 255, n & 255]; }
function inkOn(hex) { const [r, g, b] = hexRgb(hex); return 0.299 * r + 0.587 * g + 0.114 * b > 140 ? "#000" : "#fff"; }

/** Per object, once: a canvas of its mask in its colour and one of its outline (mask pixels next to background). */
function layersOf(a, w, h) {
  if (a.layers) return a.layers;
  const [r, g, b] = hexRgb(a.color);
  const fill = new ImageData(w, h), edge = new ImageData(w, h), m = a.bits;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x;
      if (!m[i]) continue;
      const p = 4 * i;
      fill.data[p] = r; fill.data[p + 1] = g; fill.data[p + 2] = b; fill.data[p + 3] = 255;
      if (x === 0 || y === 0 || x === w - 1 || y === h - 1 || !m[i - 1] || !m[i + 1] || !m[i - w] || !m[i + w]) {
        edge.data[p] = r; edge.data[p + 1] = g; edge.data[p + 2] = b; edge.data[p + 3] = 255;
      }
    }
  }
  const toCanvas = (data) => { const c = document.createElement("canvas"); c.width = w; c.height = h; c.getContext("2d").putImageData(data, 0, 0); return c; };
  a.layers = {fill: toCanvas(fill), edge: toCanvas(edge)};
  return a.layers;
}

/** The objects drawn now: [answer index, object index, answer, object] of every shown answer. */
function shownObjects() {
  const out = [];
  state.answers.forEach((a, i) => { if (a.visible) a.instances.forEach((o, k) => out.push([i, k, a, o])); });
  return out;
}

function isLit(i, k) {
  const h = state.pinned || state.highlight;
  return !h || (h.answer === i && h.instance === k);
}

function draw() {
  const canvas = $("canvas"), ctx = canvas.getContext("2d");
  const im = state.image;
  $("download-overlay").disabled = !(im && state.answers.length);
  $("placeholder").hidden = Boolean(im);
  canvas.hidden = !im;
  if (!im) { canvas.width = 1; canvas.height = 1; canvas.setAttribute("aria-label", "No image"); return; }
  const {w, h} = im;
  // Small images are drawn at 2-4x, so outlines and labels stay sharp; masks keep their pixels.
  const s = Math.max(1, Math.min(4, Math.floor(720 / Math.max(w, h))));
  canvas.width = w * s; canvas.height = h * s;
  ctx.setTransform(s, 0, 0, s, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(im.img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  const show = {mask: $("show-mask").checked, outline: $("show-outline").checked, box: $("show-box").checked,
                label: $("show-label").checked};
  const alpha = Number($("opacity").value) / 100;
  const line = Math.max(2, Math.round(Math.max(w, h) * s / 300)) / s;
  const objects = shownObjects();
  const lit = state.pinned || state.highlight;
  // The highlighted object last, on top; the others faded while one is highlighted.
  objects.sort((x, y) => Number(isLit(x[0], x[1])) - Number(isLit(y[0], y[1])));
  for (const [i, k, , o] of objects) {
    const L = layersOf(o, w, h), on = isLit(i, k), fade = lit && !on ? 0.35 : 1;
    if (show.mask && alpha > 0) { ctx.globalAlpha = alpha * fade; ctx.drawImage(L.fill, 0, 0); ctx.globalAlpha = 1; }
    if (show.outline || (lit && on)) {  // the one-pixel edge, stamped around a small disk: an outline ~`line` wide
      const t = Math.max(1, Math.round(line * s / 2)) * (lit && on ? 2 : 1);
      ctx.globalAlpha = fade;
      for (let dy = -t; dy <= t; dy++) for (let dx = -t; dx <= t; dx++) if (dx * dx + dy * dy <= t * t) ctx.drawImage(L.edge, dx / s, dy / s);
      ctx.globalAlpha = 1;
    }
  }
  const placed = [];  // label rectangles drawn so far: a label that would cover one moves down
  const size = Math.max(12, Math.round(Math.max(w, h) * s / 45)) / s;
  const label = (text, color, x1, y1, y2) => {
    ctx.font = `600 ${size}px system-ui, sans-serif`;
    const shown = text.length > 40 ? text.slice(0, 39) + "…" : text;
    const tw = ctx.measureText(shown).width + size * 0.6;
    const lh = size * 1.4, lx = Math.min(Math.max(0, x1), Math.max(0, w - tw));
    let ly = y1 - lh >= 0 ? y1 - lh : Math.min(y2, h - lh);
    while (placed.some((r) => lx < r.x + r.w && r.x < lx + tw && ly < r.y + lh && r.y < ly + lh)) ly += lh;
    placed.push({x: lx, y: ly, w: tw});
    ctx.fillStyle = color; ctx.fillRect(lx, ly, tw, lh);
    ctx.fillStyle = inkOn(color); ctx.fillText(shown, lx + size * 0.3, ly + size * 1.05);
  };
  for (const [i, k, a, o] of objects) {
    const [x1, y1, x2, y2] = o.box;
    ctx.globalAlpha = lit && !isLit(i, k) ? 0.35 : 1;
    if (show.box) {
      ctx.lineWidth = line;
      ctx.setLineDash([3 * line, 2 * line]);
      ctx.strokeStyle = "#fff"; ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);  // a light halo: visible on dark images
      ctx.setLineDash([3 * line, 2 * line]); ctx.lineDashOffset = 0;
      ctx.strokeStyle = o.color; ctx.lineWidth = line * 0.6; ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      ctx.setLineDash([]);
    }
    if (show.label) label(a.instances.length > 1 ? `${a.phrase} #${k + 1}` : a.phrase, o.color, x1, y1, y2);
    ctx.globalAlpha = 1;
  }
  if (show.label) {  // an answer without any object says so in the image's corner
    for (const a of state.answers) if (a.visible && a.noTarget) label(`${a.phrase}: no match`, NO_MATCH, 0, 0, 0);
  }
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  const first = state.answers[0];
  if (first) canvas.dataset.maskPixels = first.pixels; else delete canvas.dataset.maskPixels;
  if (lit) canvas.dataset.highlight = `${lit.answer}-${lit.instance}`; else delete canvas.dataset.highlight;
  canvas.setAttribute("aria-label", state.answers.length
    ? `${im.name} with ${state.answers.length} answer(s): ` + state.answers.map(summary).join("; ")
    : im.name);
}

// ------------------------------------------------------------------------------------------------
// Answers: cards, downloads, history

function slug(s) { return s.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 40) || "answer"; }

function download(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

function maskPng(a) {
  const [h, w] = a.mask.size;
  const c = document.createElement("canvas"); c.width = w; c.height = h;
  const ctx = c.getContext("2d"), data = ctx.createImageData(w, h);
  for (let i = 0; i < a.bits.length; i++) {
    const v = a.bits[i] ? 255 : 0, p = 4 * i;
    data.data[p] = v; data.data[p + 1] = v; data.data[p + 2] = v; data.data[p + 3] = 255;
  }
  ctx.putImageData(data, 0, 0);
  return new Promise((resolve) => c.toBlob(resolve, "image/png"));
}

function answerJson(a) {
  const m = state.model || {};
  return JSON.stringify({
    phrase: a.phrase, no_target: a.noTarget, box: a.box, box_format: "XYXY pixels", score: a.score,
    mask: a.mask,  // the union of the objects' masks, COCO compressed RLE: pycocotools.mask.decode or ppcr.masks.decode_rle
    mask_pixels: a.pixels,
    instances: a.instances.map((o) => ({box: o.box, score: o.score, mask: o.mask, mask_pixels: o.pixels})),
    image: state.image ? state.image.name : null, timings_ms: a.timings,
    model: {preset: m.preset, checkpoint: m.checkpoint, random_weights: m.random_weights},
  }, null, 2);
}

/** Highlight one object (pointer or focus on its entry), or none. */
function hover(target) {
  state.highlight = target;
  draw();
}

/** Pin the highlight on one object (a click on its entry), or release it (a second click). */
function pin(target) {
  const same = state.pinned && target && state.pinned.answer === target.answer && state.pinned.instance === target.instance;
  state.pinned = same ? null : target;
  for (const b of document.querySelectorAll("#cards .pick")) {
    const on = Boolean(state.pinned) && Number(b.dataset.answer) === state.pinned.answer && Number(b.dataset.instance) === state.pinned.instance;
    b.setAttribute("aria-pressed", String(on));
  }
  draw();
  if (state.pinned) {
    const a = state.answers[target.answer], o = a.instances[target.instance];
    say(`Highlighted ${a.phrase} #${target.instance + 1}: score ${o.score.toFixed(2)}, ${o.pixels} px.`);
  } else {
    say("No object highlighted.");
  }
}

function objectList(a, i) {
  const items = a.instances.map((o, k) => {
    const box = o.box.map((v) => Math.round(v)).join(", ");
    return `<li class="instance" style="--c: ${o.color}" data-mask-pixels="${o.pixels}" data-score="${o.score}">
      <button type="button" class="pick" data-answer="${i}" data-instance="${k}" aria-pressed="false"
        aria-label="${esc(a.phrase)} #${k + 1}: score ${o.score.toFixed(3)}, box ${box}, ${o.pixels} pixels; highlight it">
        <span class="swatch" aria-hidden="true"></span><span>#${k + 1}</span>
        <span>score ${o.score.toFixed(3)}</span><span class="muted">[${box}] · ${o.pixels.toLocaleString()} px</span>
      </button></li>`;
  });
  return `<ul class="instances" aria-label="objects found for ${esc(a.phrase)}">${items.join("")}</ul>`;
}

function renderCards() {
  const list = $("cards");
  list.textContent = "";
  state.answers.forEach((a, i) => {
    const li = document.createElement("li");
    const n = a.instances.length;
    li.className = a.noTarget ? "card no-match" : "card";
    li.style.setProperty("--c", a.color);
    li.dataset.phrase = a.phrase;
    li.dataset.maskPixels = a.pixels;
    li.dataset.noTarget = String(a.noTarget);
    li.dataset.instances = String(n);
    let facts;
    if (a.noTarget) {
      facts = `<p class="verdict"><strong>No match</strong>: nothing in the image fits this phrase.</p>
        <dl><dt>time</dt><dd>${a.ms} ms (request)</dd></dl>`;
    } else {
      const box = a.box.map((v) => Math.round(v)).join(", ");
      facts = (n > 1 ? `<p class="verdict"><strong>${n} objects</strong> (hover or click one to pick it out)</p>` : "") +
        `<dl><dt>score</dt><dd>${a.score.toFixed(3)}${n > 1 ? " (mean)" : ""}</dd><dt>box</dt><dd>[${box}]${n > 1 ? " (all)" : ""}</dd>
        <dt>mask</dt><dd>${a.pixels.toLocaleString()} px</dd><dt>time</dt><dd>${a.ms} ms (request)</dd></dl>` +
        (n > 1 ? objectList(a, i) : "");
    }
    li.innerHTML = `<h3><span class="swatch" aria-hidden="true"></span>${esc(a.phrase)}</h3>
      ${facts}
      <div class="row">
        <label><input type="checkbox" class="visible" ${a.visible ? "checked" : ""}> show</label>
        <button type="button" class="secondary mask-png">Mask PNG</button>
        <button type="button" class="secondary json">JSON</button>
      </div>`;
    li.querySelector(".visible").setAttribute("aria-label", `show ${a.phrase}`);
    li.querySelector(".mask-png").setAttribute("aria-label", `download the mask of ${a.phrase} as PNG` + (n > 1 ? " (all its objects)" : ""));
    li.querySelector(".json").setAttribute("aria-label", `download the answer for ${a.phrase} as JSON with its RLE mask`);
    li.querySelector(".visible").addEventListener("change", (ev) => { a.visible = ev.target.checked; draw(); });
    li.querySelector(".mask-png").addEventListener("click", async () => download(await maskPng(a), `mask-${i + 1}-${slug(a.phrase)}.png`));
    li.querySelector(".json").addEventListener("click", () =>
      download(new Blob([answerJson(a)], {type: "application/json"}), `answer-${i + 1}-${slug(a.phrase)}.json`));
    for (const b of li.querySelectorAll(".pick")) {
      const target = {answer: i, instance: Number(b.dataset.instance)};
      b.addEventListener("mouseenter", () => hover(target));
      b.addEventListener("focus", () => hover(target));
      b.addEventListener("mouseleave", () => hover(null));
      b.addEventListener("blur", () => hover(null));
      b.addEventListener("click", () => pin(target));
    }
    list.appendChild(li);
  });
}

function renderHistory() {
  const list = $("history");
  list.textContent = "";
  $("history-count").textContent = state.history.length;
  for (const entry of state.history) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = `${entry.when.toLocaleTimeString()} · ${entry.image.name} · ` + entry.answers.map((a) => a.phrase).join(", ");
    b.addEventListener("click", () => {
      state.image = entry.image;
      state.answers = entry.answers;
      state.highlight = state.pinned = null;
      $("phrases").value = entry.answers.map((a) => a.phrase).join("\n");
      $("image-name").textContent = `${entry.image.name} · ${entry.image.w}×${entry.image.h}`;
      clearError();
      setState("done");
      renderCards();
      draw();
      updateToyBanner();
      say(`Showing earlier answers for ${entry.image.name}.`);
    });
    li.appendChild(b);
    list.appendChild(li);
  }
}

// ------------------------------------------------------------------------------------------------

function wireControls() {
  $("form").addEventListener("submit", (ev) => { ev.preventDefault(); segment(); });
  $("phrases").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); segment(); }
  });
  for (const id of ["show-mask", "show-outline", "show-box", "show-label"]) $(id).addEventListener("change", draw);
  $("opacity").addEventListener("input", () => { $("opacity-value").textContent = `${$("opacity").value} %`; draw(); });
  $("download-overlay").addEventListener("click", () => {
    $("canvas").toBlob((b) => download(b, `overlay-${slug(state.image ? state.image.name : "image")}.png`), "image/png");
  });
}

async function main() {
  wireInputs();
  wireControls();
  const health = loadHealth();
  loadGallery();
  // ?example=1[&expression=...]: a small synthetic image and a phrase, segmented at once (links, tests).
  const params = new URLSearchParams(location.search);
  if (params.has("example")) {
    await health;
    $("phrases").value = params.getAll("expression").join("\n") || "the red circle";
    const blob = await (await fetch("/example.png")).blob();
    await setImage(blob, "example", "synthetic");
    await segment();
  }
}

main();
