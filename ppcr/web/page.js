// The ppcr page: one image, several phrases, one coloured answer per phrase. Plain JS, no build step,
// nothing loaded from elsewhere. The masks arrive as COCO RLE and are decoded here.
"use strict";

// Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour-vision deficiency.
const PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"];
const $ = (id) => document.getElementById(id);

const state = {
  model: null,       // /healthz's "model" (or null when the server did not answer)
  limits: null,
  image: null,       // {blob, name, kind: "synthetic"|"photo"|"upload", img, w, h, url}
  answers: [],       // the answers shown now
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
    state.answers = results.map((r, i) => makeAnswer(texts[i], r, i, ms, answer.timings_ms));
    state.history.unshift({image: state.image, answers: state.answers, when: new Date()});
    state.history = state.history.slice(0, 20);
    renderCards();
    renderHistory();
    draw();
    setState("done");
    if (window.matchMedia("(max-width: 860px)").matches) $("status").scrollIntoView({block: "start"});
    say(`${state.answers.length} answer${state.answers.length > 1 ? "s" : ""} in ${ms} ms: ` +
      state.answers.map((a) => `${a.phrase} (score ${a.score.toFixed(2)})`).join("; ") + ".");
  } finally {
    state.busy = false;
    $("go").disabled = false;
    $("spinner").hidden = true;
    $("stage").removeAttribute("aria-busy");
  }
}

function makeAnswer(phrase, r, i, ms, timings) {
  const bits = decodeRle(r.mask);
  let pixels = 0;
  for (let k = 0; k < bits.length; k++) pixels += bits[k];
  return {phrase, box: r.box, score: r.score, mask: r.mask, bits, pixels, ms, timings, color: PALETTE[i % PALETTE.length],
          visible: true, layers: null};
}

// ------------------------------------------------------------------------------------------------
// Drawing

function hexRgb(hex) { const n = parseInt(hex.slice(1), 16); return [n >> 16, (n >> 8) & 255, n & 255]; }
function inkOn(hex) { const [r, g, b] = hexRgb(hex); return 0.299 * r + 0.587 * g + 0.114 * b > 140 ? "#000" : "#fff"; }

/** Per answer, once: a canvas of its mask in its colour and one of its outline (mask pixels next to background). */
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
  for (const a of state.answers) {
    if (!a.visible) continue;
    const L = layersOf(a, w, h);
    if (show.mask && alpha > 0) { ctx.globalAlpha = alpha; ctx.drawImage(L.fill, 0, 0); ctx.globalAlpha = 1; }
    if (show.outline) {  // the one-pixel edge, stamped around a small disk: an outline ~`line` wide
      const t = Math.max(1, Math.round(line * s / 2));
      for (let dy = -t; dy <= t; dy++) for (let dx = -t; dx <= t; dx++) if (dx * dx + dy * dy <= t * t) ctx.drawImage(L.edge, dx / s, dy / s);
    }
  }
  const placed = [];  // label rectangles drawn so far: a label that would cover one moves down
  for (const a of state.answers) {
    if (!a.visible) continue;
    const [x1, y1, x2, y2] = a.box;
    if (show.box) {
      ctx.lineWidth = line;
      ctx.setLineDash([3 * line, 2 * line]);
      ctx.strokeStyle = "#fff"; ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);  // a light halo: visible on dark images
      ctx.setLineDash([3 * line, 2 * line]); ctx.lineDashOffset = 0;
      ctx.strokeStyle = a.color; ctx.lineWidth = line * 0.6; ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      ctx.setLineDash([]);
    }
    if (show.label) {
      const size = Math.max(12, Math.round(Math.max(w, h) * s / 45)) / s;
      ctx.font = `600 ${size}px system-ui, sans-serif`;
      const text = a.phrase.length > 40 ? a.phrase.slice(0, 39) + "…" : a.phrase;
      const tw = ctx.measureText(text).width + size * 0.6;
      const lh = size * 1.4, lx = Math.min(Math.max(0, x1), Math.max(0, w - tw));
      let ly = y1 - lh >= 0 ? y1 - lh : Math.min(y2, h - lh);
      while (placed.some((r) => lx < r.x + r.w && r.x < lx + tw && ly < r.y + lh && r.y < ly + lh)) ly += lh;
      placed.push({x: lx, y: ly, w: tw});
      ctx.fillStyle = a.color; ctx.fillRect(lx, ly, tw, lh);
      ctx.fillStyle = inkOn(a.color); ctx.fillText(text, lx + size * 0.3, ly + size * 1.05);
    }
  }
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  const first = state.answers[0];
  if (first) canvas.dataset.maskPixels = first.pixels; else delete canvas.dataset.maskPixels;
  canvas.setAttribute("aria-label", state.answers.length
    ? `${im.name} with ${state.answers.length} answer(s): ` + state.answers.map((a) => a.phrase).join(", ")
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
    phrase: a.phrase, box: a.box, box_format: "XYXY pixels", score: a.score,
    mask: a.mask,  // COCO compressed RLE: pycocotools.mask.decode or ppcr.data.refer.decode_rle
    mask_pixels: a.pixels, image: state.image ? state.image.name : null, timings_ms: a.timings,
    model: {preset: m.preset, checkpoint: m.checkpoint, random_weights: m.random_weights},
  }, null, 2);
}

function renderCards() {
  const list = $("cards");
  list.textContent = "";
  state.answers.forEach((a, i) => {
    const li = document.createElement("li");
    li.className = "card";
    li.style.setProperty("--c", a.color);
    li.dataset.phrase = a.phrase;
    li.dataset.maskPixels = a.pixels;
    const box = a.box.map((v) => Math.round(v)).join(", ");
    li.innerHTML = `<h3><span class="swatch" aria-hidden="true"></span>${esc(a.phrase)}</h3>
      <dl><dt>score</dt><dd>${a.score.toFixed(3)}</dd><dt>box</dt><dd>[${box}]</dd>
      <dt>mask</dt><dd>${a.pixels.toLocaleString()} px</dd><dt>time</dt><dd>${a.ms} ms (request)</dd></dl>
      <div class="row">
        <label><input type="checkbox" class="visible" ${a.visible ? "checked" : ""}> show</label>
        <button type="button" class="secondary mask-png">Mask PNG</button>
        <button type="button" class="secondary json">JSON</button>
      </div>`;
    li.querySelector(".visible").setAttribute("aria-label", `show ${a.phrase}`);
    li.querySelector(".mask-png").setAttribute("aria-label", `download the mask of ${a.phrase} as PNG`);
    li.querySelector(".json").setAttribute("aria-label", `download the answer for ${a.phrase} as JSON with its RLE mask`);
    li.querySelector(".visible").addEventListener("change", (ev) => { a.visible = ev.target.checked; draw(); });
    li.querySelector(".mask-png").addEventListener("click", async () => download(await maskPng(a), `mask-${i + 1}-${slug(a.phrase)}.png`));
    li.querySelector(".json").addEventListener("click", () =>
      download(new Blob([answerJson(a)], {type: "application/json"}), `answer-${i + 1}-${slug(a.phrase)}.json`));
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
