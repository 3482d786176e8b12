// meshserve up's console: polls /api/mesh and /api/events, drives the canary through
// /api/canary, and runs "try it" with the @meshserve/web package (served at /pkg/).
// Text from the mesh goes into the page as text (textContent), never as markup.

const POLL_MS = 1000;
const EVENTS_MS = 2000;
const HEADERS = { "x-meshserve-console": "1" };

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

const fixed = (v, digits = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));
const ms = (v) => (v === null || v === undefined ? "–" : v < 10 ? v.toFixed(2) : v.toFixed(1));
// Envoy times upstream requests in whole milliseconds: below one it reads 0.
const envoyMs = (v) => (v === 0 ? "<1" : ms(v));

// ---- services and revisions ----------------------------------------------------------------

const cards = new Map();
let mesh = null;

function card(service) {
  if (cards.has(service.name)) return cards.get(service.name);
  const id = service.name;
  const configured = el("div", { class: "bar", role: "img", id: `configured-${id}` });
  const observed = el("div", { class: "bar", role: "img", id: `observed-${id}` });
  const rows = el("tbody", { id: `revisions-${id}` });
  const table = el("table", { class: "revisions" },
    el("caption", { class: "visually-hidden", text: `Revisions of ${id}` }),
    el("thead", {}, el("tr", {},
      ...["Revision", "Role", "State"].map((h) => el("th", { scope: "col", text: h })),
      ...["Configured", "Observed", "Req/s", "Latency p50 / p90 / p99 (ms)", "Model p50 / p99 (ms)",
        "Errors (5xx)", "Rejected (4xx)"].map((h) => el("th", { scope: "col", class: "num", text: h })))),
    rows);
  const node = el("article", { class: "service", "data-isvc": id, "aria-labelledby": `title-${id}` },
    el("header", {},
      el("h3", { id: `title-${id}`, text: id }),
      el("span", { class: "ns", text: `namespace ${service.namespace}` }),
      el("span", { class: "models", text: `models: ${(service.models || []).join(", ")}` })),
    el("div", { class: "bars" },
      el("span", { class: "name", text: "configured" }), configured,
      el("span", { class: "name", text: "observed" }), observed),
    table);
  $("services").append(node);
  const entry = { node, rows, configured, observed, byName: new Map(), names: "", canary: null, form: null };
  cards.set(service.name, entry);
  return entry;
}

// The canary controls follow the configuration: built for the service's canary, rebuilt when
// another revision becomes it (a promote, or meshserve canary), gone when there is none.
function syncCanary(entry, service) {
  const canary = service.revisions.find((r) => r.role === "canary");
  const name = canary ? canary.name : null;
  if (name !== entry.canary) {
    entry.form?.remove();
    entry.form = canary ? canaryForm(service, canary) : null;
    if (entry.form) entry.node.append(entry.form);
    entry.canary = name;
    entry.percent = canary?.percent;
  }
  if (!canary) return;
  // A change made elsewhere shows in the controls, unless they are being edited.
  const number = entry.form.querySelector("input[type=number]");
  const range = entry.form.querySelector("input[type=range]");
  if (entry.percent !== canary.percent && ![number, range].includes(document.activeElement)) {
    number.value = range.value = String(canary.percent);
    entry.percent = canary.percent;
  }
}

function canaryForm(service, canary) {
  const id = service.name;
  const number = el("input", { type: "number", id: `percent-${id}`, min: "0", max: "100", step: "1",
    value: String(canary.percent), required: "", "aria-describedby": `status-${id}` });
  const range = el("input", { type: "range", id: `range-${id}`, min: "0", max: "100", step: "1",
    value: String(canary.percent), "aria-label": `Canary share of ${id}, slider` });
  number.addEventListener("input", () => { range.value = number.value; });
  range.addEventListener("input", () => { number.value = range.value; });
  const status = el("p", { class: "canary-status", id: `status-${id}`, role: "status", "aria-live": "polite" });
  const form = el("form", { class: "canary-form", id: `canary-${id}` },
    el("label", { for: `percent-${id}`, text: `Canary ${canary.name}: share (%)` }), number, range,
    el("button", { type: "submit", id: `set-${id}`, text: "Set" }),
    el("button", { type: "button", class: "secondary", id: `promote-${id}`, text: "Promote" }),
    el("button", { type: "button", class: "secondary", id: `rollback-${id}`, text: "Roll back" }),
    status);
  const send = async (body) => {
    status.className = "canary-status";
    status.textContent = "applying…";
    try {
      const res = await fetch("/api/canary", {
        method: "POST", headers: { ...HEADERS, "content-type": "application/json" },
        body: JSON.stringify({ isvc: id, canary: canary.name, ...body }),
      });
      const answer = await res.json();
      if (!res.ok) throw new Error(answer.error || res.statusText);
      status.textContent = `Applied, live: ${answer.split}`;
      if (body.action === "rollback") number.value = range.value = "0";
    } catch (e) {
      status.className = "canary-status bad";
      status.textContent = `Not applied: ${e.message}`;
    }
  };
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const percent = number.value.trim();
    if (!/^\d{1,3}$/.test(percent) || Number(percent) > 100) {
      status.className = "canary-status bad";
      status.textContent = "Give a whole number from 0 to 100.";
      number.focus();
      return;
    }
    send({ action: "percent", percent: Number(percent) });
  });
  form.querySelector(`#promote-${CSS.escape(id)}`).addEventListener("click", () => send({ action: "promote" }));
  form.querySelector(`#rollback-${CSS.escape(id)}`).addEventListener("click", () => send({ action: "rollback" }));
  return form;
}

function bar(node, revisions, key, label) {
  const parts = revisions.filter((r) => r.role !== "shadow" && r[key] !== null);
  node.replaceChildren(...parts.map((r) => {
    const part = el("span", { class: r.role, title: `${r.name} ${fixed(r[key])}%` });
    part.style.width = `${Math.max(0, Math.min(100, r[key]))}%`; // CSSOM: the CSP allows no style attributes
    return part;
  }));
  node.setAttribute("aria-label", parts.length
    ? `${label}: ${parts.map((r) => `${r.name} ${fixed(r[key], 0)}%`).join(", ")}`
    : `${label}: no requests in the window`);
}

const FIELDS = ["state", "percent", "observed", "rate", "latency", "model", "errors", "rejected"];

function newRow(r) {
  return el("tr", { "data-revision": r.name },
    el("th", { scope: "row", text: r.name }),
    el("td", {}, el("span", { class: `role ${r.role}`, text: r.role })),
    ...FIELDS.map((f) => el("td", { class: f === "state" ? "" : "num", "data-field": f })));
}

// Writes a cell only when its text changes: a screen reader's place in the table stays put.
function setCell(tr, field, text, className) {
  const td = tr.querySelector(`[data-field="${field}"]`);
  if (td.textContent !== text) td.textContent = text;
  if (className !== undefined && td.className !== className) td.className = className;
}

function renderServices(view) {
  for (const service of view.services) {
    const entry = card(service);
    syncCanary(entry, service);
    bar(entry.configured, service.revisions, "percent", "Configured split");
    bar(entry.observed, service.revisions, "observed_percent", "Observed split");
    const names = service.revisions.map((r) => `${r.name}:${r.role}`).join(",");
    if (names !== entry.names) {
      entry.byName = new Map(service.revisions.map((r) => [r.name, newRow(r)]));
      entry.rows.replaceChildren(...entry.byName.values());
      entry.names = names;
    }
    for (const r of service.revisions) {
      const tr = entry.byName.get(r.name);
      const latency = r.latency_ms
        ? `${envoyMs(r.latency_ms.p50)} / ${envoyMs(r.latency_ms.p90)} / ${envoyMs(r.latency_ms.p99)}${r.latency_span === "cumulative" ? " (since start)" : ""}`
        : "–";
      setCell(tr, "state", r.state, `state-${r.state}`);
      setCell(tr, "percent", r.role === "shadow" ? `copy of ${r.percent}%` : `${r.percent}%`);
      setCell(tr, "observed", r.observed_percent === null ? "–" : `${fixed(r.observed_percent)}%`);
      setCell(tr, "rate", fixed(r.rate));
      setCell(tr, "latency", latency);
      setCell(tr, "model", r.model_ms ? `${ms(r.model_ms.p50)} / ${ms(r.model_ms.p99)}` : "–");
      setCell(tr, "errors", String(r.errors), r.errors ? "num errors" : "num");
      setCell(tr, "rejected", String(r.rejected));
    }
  }
}

// Said once when the console loses the mesh, and once when it has it again.
let connected = null;
function connection(ok, text) {
  if (ok === connected) return;
  connected = ok;
  $("connection").textContent = text;
}

async function poll() {
  try {
    const res = await fetch("/api/mesh");
    const view = await res.json();
    if (!res.ok) throw new Error(view.error || res.statusText);
    mesh = view;
    $("envoy").textContent = `http://${view.envoy}`;
    $("window").textContent = view.window_s ? view.window_s.toFixed(0) : "10";
    renderServices(view);
    fillTryServices(view);
    const updated = $("updated");
    updated.className = "updated";
    updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    connection(true, "The console reads the mesh.");
  } catch (e) {
    const updated = $("updated");
    updated.className = "updated stale";
    updated.textContent = `cannot read the mesh: ${e.message}`;
    connection(false, `The console cannot read the mesh: ${e.message}`);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

// ---- payload-log events --------------------------------------------------------------------

async function pollEvents() {
  try {
    const res = await fetch("/api/events");
    const { events } = await res.json();
    $("events-empty").hidden = events.length > 0;
    $("events").replaceChildren(...events.map((e) => {
      const a = e.attributes || {};
      const kind = (a.type || "").split(".").pop();
      const payload = e.payload + (e.payload_cut ? "…" : "");
      const time = a.time || "";
      const id = a.id || "";
      return el("tr", {},
        el("td", {}, el("time", { datetime: time, title: time, text: time.slice(11, 23) || time })),
        el("td", { text: kind }),
        el("td", { text: a.inferenceservicename || e.isvc }),
        el("td", { text: e.revision }),
        el("td", {}, el("code", { title: id, text: id.length > 8 ? `${id.slice(0, 8)}…` : id })),
        el("td", { text: a.statuscode || "" }),
        el("td", { class: "num", text: String(e.bytes) }),
        el("td", {}, el("code", { title: payload, text: payload })));
    }));
  } catch (e) {
    // The next poll tries again; the mesh poll reports a console that is gone.
  } finally {
    setTimeout(pollEvents, EVENTS_MS);
  }
}

// ---- try it --------------------------------------------------------------------------------

let web = null;

async function loadPackage() {
  try {
    web = await import("/pkg/meshserve_web.js");
    await web.default();
  } catch (e) {
    web = null;
    say(`The browser package is not here (${e.message}): bash scripts/build-web.sh builds it.`, true);
  }
}

function say(text, bad = false) {
  const status = $("try-status");
  status.className = bad ? "bad" : "";
  status.textContent = text;
}

const takesPictures = (s) => (s.transformer?.request?.steps || []).includes("image_decode");

function fillTryServices(view) {
  const select = $("try-service");
  const names = view.services.filter(takesPictures).map((s) => s.name);
  if (select.dataset.names === names.join(",")) return;
  select.dataset.names = names.join(",");
  select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
  $("try-run").disabled = names.length === 0;
  if (names.length === 0) say("No InferenceService here has a picture transformer.");
}

// The tensor as a picture: [1, C, H, W] (nchw), [1, H, W, C] (nhwc) or a square flat row,
// each value scaled from the tensor's range to 0..255.
function geometry(tensor) {
  const s = tensor.shape.slice(1);
  if (s.length === 3 && (s[0] === 1 || s[0] === 3)) return { c: s[0], h: s[1], w: s[2], planar: true };
  if (s.length === 3) return { h: s[0], w: s[1], c: s[2], planar: false };
  if (s.length === 2) return { h: s[0], w: s[1], c: 1, planar: true };
  const side = Math.round(Math.sqrt(s[0] || tensor.data.length));
  return { h: side, w: side, c: 1, planar: true };
}

function drawTensor(canvas, tensor) {
  const { c, h, w, planar } = geometry(tensor);
  const data = tensor.data.map(Number);
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of data) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  const span = hi > lo ? hi - lo : 1;
  const image = new ImageData(w, h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const at = (k) => (planar ? k * h * w + y * w + x : (y * w + x) * c + k);
      const rgb = [0, 1, 2].map((k) => Math.round(255 * (data[at(c === 3 ? k : 0)] - lo) / span));
      image.data.set([...rgb, 255], (y * w + x) * 4);
    }
  }
  paint(canvas, image);
  return { h, w };
}

function paint(canvas, image) {
  const small = new OffscreenCanvas(image.width, image.height);
  small.getContext("2d").putImageData(image, 0, 0);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
}

// Attributions over the input: red where the pixel raised the answer's score, blue where it
// lowered it, over the input in grey.
function drawHeatmap(canvas, tensor, attributions) {
  const rows = attributions.length;
  const cols = attributions[0].length;
  const flat = attributions.flat(Infinity);
  let peak = 0;
  for (const v of flat) peak = Math.max(peak, Math.abs(v));
  peak = peak || 1;
  const { c, h, w, planar } = geometry(tensor);
  const data = tensor.data.map(Number);
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of data) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  const span = (hi - lo) || 1;
  const image = new ImageData(cols, rows);
  for (let y = 0; y < rows; y++) {
    for (let x = 0; x < cols; x++) {
      const v = flat[y * cols + x] / peak;
      const px = planar ? (y * h / rows | 0) * w + (x * w / cols | 0) : ((y * h / rows | 0) * w + (x * w / cols | 0)) * c;
      const grey = 90 * (data[px] - lo) / span;
      const rgb = v >= 0 ? [grey + 165 * v, grey, grey] : [grey, grey, grey - 165 * v];
      image.data.set([...rgb.map(Math.round), 255], (y * cols + x) * 4);
    }
  }
  paint(canvas, image);
}

async function post(path, body, headers) {
  const res = await fetch(`/api/infer${path}`, { method: "POST", body, headers: { ...HEADERS, ...headers } });
  const length = res.headers.get("inference-header-content-length");
  return {
    ok: res.ok,
    revision: res.headers.get("x-meshserve-revision"),
    length: length === null ? undefined : Number(length),
    bytes: new Uint8Array(await res.arrayBuffer()),
  };
}

function showAnswer(response, revision) {
  const outputs = response.outputs || [];
  const labels = outputs.find((o) => o.datatype === "BYTES");
  const scores = outputs.find((o) => o !== labels && o.datatype.startsWith("FP"));
  const list = $("try-answer");
  if (labels) {
    $("try-top").textContent = String(labels.data[0]);
    list.replaceChildren(...labels.data.map((label, i) => el("li", {
      text: scores ? `${label}: ${Number(scores.data[i]).toFixed(4)}` : String(label),
    })));
  } else if (outputs.length) {
    const values = outputs[0].data.map(Number).slice(0, 1000);
    const best = values.reduce((b, v, i) => (v > values[b] ? i : b), 0);
    $("try-top").textContent = String(best);
    list.replaceChildren(...values.map((v, i) => el("li", { text: `${i}: ${v.toFixed(4)}` })));
  }
  $("try-revision").textContent = revision ? `answered by revision ${revision}` : "";
}

async function run(event) {
  event.preventDefault();
  const service = mesh?.services.find((s) => s.name === $("try-service").value);
  const file = $("try-file").files[0];
  if (!service || !file) return say("Pick an InferenceService and a picture.", true);
  if (!web) return say("The browser package is not loaded: bash scripts/build-web.sh builds it.", true);
  const model = service.models[0] || service.name;
  $("try-run").disabled = true;
  try {
    const bytes = new Uint8Array(await file.arrayBuffer());
    say("pre-processing in the page…");
    const tensor = web.transform(service.transformer, bytes);
    const { h, w } = drawTensor($("try-input"), tensor);
    $("try-input-caption").textContent = `The model's input: ${tensor.name}, ${tensor.datatype} ${JSON.stringify(tensor.shape)} (${w}x${h}), made in this page`;
    $("try-input").setAttribute("aria-label", `The ${w} by ${h} input the model sees`);
    say("sending the tensor through Envoy…");
    const request = web.encodeInferRequest({ inputs: [tensor] }, true);
    const answer = await post(`/v2/models/${encodeURIComponent(model)}/infer`, request.body, {
      "content-type": request.contentType,
      "inference-header-content-length": String(request.headerLength),
    });
    const response = web.parseInferResponse(answer.bytes, answer.length);
    showAnswer(response, answer.revision);
    say(`${file.name}: ${bytes.length} bytes became a ${JSON.stringify(tensor.shape)} tensor in the page; Envoy's answer is above.`);
    if (service.explainer) {
      say(`${$("try-status").textContent} Explaining…`);
      const field = service.transformer.request.field;
      const instance = field ? { [field]: bytes } : bytes;
      const explained = await post(`/v1/models/${encodeURIComponent(model)}:explain`,
        web.encodeV1Request([instance]), { "content-type": "application/json" });
      const doc = web.parseV1Response(explained.bytes);
      const map = doc.data?.attributions?.[0];
      if (map) {
        drawHeatmap($("try-heatmap"), tensor, map.length === 1 ? map[0] : map);
        const target = doc.data.target?.[0];
        $("try-heatmap-caption").textContent = `${doc.meta?.name || "Explanation"}: red raised the score of class ${target}, blue lowered it`;
        $("try-heatmap").setAttribute("aria-label", `Heat map of where the answer rests, class ${target}`);
      }
      say($("try-status").textContent.replace(" Explaining…", " Explained."));
    }
  } catch (e) {
    say(`Failed: ${e.message}`, true);
  } finally {
    $("try-run").disabled = false;
  }
}

$("try-form").addEventListener("submit", run);
loadPackage();
poll();
pollEvents();
