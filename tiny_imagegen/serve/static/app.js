// The page of `tiny-imagegen serve`: a form that queues jobs (POST /api/jobs; with an image, the
// edits route's multipart form, so an edit shows its steps too), their events read
// as a stream (so the bearer token can be sent, which EventSource cannot), and a gallery of the
// output folder's images with their parameters (GET /api/images).
"use strict";

const $ = (id) => document.getElementById(id);
const FIELDS = ["prompt", "negative_prompt", "model", "width", "height", "steps", "guidance", "seed", "n", "lora"];
let token = localStorage.getItem("tiny-imagegen-token") || "";
let current = null; // the job whose progress is shown
const waiting = []; // job ids queued from this page, shown in order

function headers(extra = {}) {
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (response.status === 401) {
    $("token-row").hidden = false;
    throw new Error("this server needs its token (above)");
  }
  return response;
}

async function json(path, options) {
  const response = await api(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

// The events of a job, as server-sent events read from a fetch stream.
async function follow(id, onEvent) {
  const response = await api(`/api/jobs/${id}/events`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  }
}

async function loadModels() {
  const body = await json("/api/models");
  const select = $("model");
  select.innerHTML = "";
  for (const m of body.models) { // the registry; those not here are listed with their state, not choosable
    const state = m.loaded ? "loaded" : m.runnable ? m.here : `${m.here}: tiny-imagegen generate --model ${m.name} fetches it`;
    const option = new Option(`${m.name} (${state})`, m.name, false, m.name === body.default);
    option.disabled = !m.runnable;
    option.dataset.defaults = JSON.stringify(m.defaults);
    select.add(option);
  }
  showDefaults();
  $("server-state").textContent = `${body.loaded.length} model(s) loaded`;
}

function showDefaults() {
  const option = $("model").selectedOptions[0];
  if (!option) return;
  const d = JSON.parse(option.dataset.defaults);
  $("width").placeholder = d.width;
  $("height").placeholder = d.height;
  $("steps").placeholder = `${d.steps} (default)`;
  $("guidance").placeholder = `${d.guidance} (default)`;
}

function formFields() {
  const fields = {};
  for (const name of FIELDS) {
    const value = $(name).value.trim();
    if (value === "" || (name === "seed" && $("random-seed").checked)) continue;
    if (name === "lora") fields.lora = value.split(",").map((s) => s.trim()).filter(Boolean);
    else if (["width", "height", "steps", "seed", "n"].includes(name)) fields[name] = Number(value);
    else if (name === "guidance") fields[name] = Number(value);
    else fields[name] = value;
  }
  return fields;
}

// An edit (an image chosen): the edits route's multipart form, sent to /api/jobs to follow its steps.
function editForm(fields) {
  const form = new FormData();
  form.append("image", $("image").files[0]);
  if ($("mask").files.length) form.append("mask", $("mask").files[0]);
  for (const key of ["prompt", "negative_prompt", "model", "steps", "guidance", "seed", "n"]) {
    if (fields[key] !== undefined) form.append(key, String(fields[key]));
  }
  if (fields.width !== undefined && fields.height !== undefined) form.append("size", `${fields.width}x${fields.height}`);
  if ($("strength").value.trim() !== "") form.append("strength", $("strength").value.trim());
  return form;
}

async function submit(event) {
  event.preventDefault();
  $("form-error").hidden = true;
  try {
    const fields = formFields();
    const job = await json("/api/jobs", $("image").files.length ? { method: "POST", body: editForm(fields) } : {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(fields),
    });
    waiting.push(job.id);
    watch(job.id);
  } catch (e) {
    $("form-error").textContent = e.message;
    $("form-error").hidden = false;
  }
}

function showQueue() {
  const list = $("queue");
  list.innerHTML = "";
  for (const id of waiting.filter((id) => id !== current)) {
    const item = document.createElement("li");
    item.textContent = `job ${id} waiting `;
    const cancel = document.createElement("button");
    cancel.className = "secondary";
    cancel.textContent = "Cancel";
    cancel.onclick = () => api(`/api/jobs/${id}`, { method: "DELETE" });
    item.append(cancel);
    list.append(item);
  }
}

function watch(id) {
  showQueue();
  follow(id, (e) => {
    if (e.type === "queued") {
      if (current === null || current === id) show(id, `queued, position ${e.position}`);
    } else if (e.type === "started") {
      show(id, "loading the model / encoding the prompt");
    } else if (e.type === "step") {
      show(id, `step ${e.step} / ${e.total}`, e.step / e.total);
      if (e.preview) $("preview").src = e.preview;
    } else if (["done", "error", "cancelled"].includes(e.type)) {
      waiting.splice(waiting.indexOf(id), 1);
      if (current === id) {
        show(id, e.type === "error" ? `error: ${e.message}` : e.type, e.type === "done" ? 1 : undefined);
        current = null;
        $("cancel").disabled = true;
      }
      if (e.type === "done") {
        for (const image of e.images.slice().reverse()) addCard(image, true);
        loadModels().catch(() => {});
      }
      showQueue();
    }
  }).catch((err) => show(id, `lost the job's events: ${err.message}`));
}

function show(id, text, fraction) {
  current = id;
  $("current").hidden = false;
  $("status").textContent = `${text} (job ${id})`;
  $("status").dataset.job = id;
  if (fraction !== undefined) $("progress").value = fraction;
  $("cancel").disabled = false;
  showQueue();
}

const SHOWN = ["prompt", "negative_prompt", "model", "width", "height", "steps", "guidance", "seed"];

async function addCard(image, first) {
  if (document.querySelector(`.card[data-name="${image.name}"]`)) return;
  const card = document.createElement("div");
  card.className = "card";
  card.dataset.name = image.name;
  const img = document.createElement("img");
  img.alt = image.parameters.prompt;
  const list = document.createElement("dl");
  for (const key of SHOWN) {
    const value = image.parameters[key];
    if (value === undefined || value === "") continue;
    list.append(Object.assign(document.createElement("dt"), { textContent: key.replace("_", " ") }),
                Object.assign(document.createElement("dd"), { textContent: value }));
  }
  const reuse = Object.assign(document.createElement("button"), { type: "button", className: "reuse",
                                                                  textContent: "Use these parameters" });
  reuse.onclick = () => useParameters(image.parameters);
  const download = Object.assign(document.createElement("a"), { className: "download", textContent: "Download",
                                                                download: image.name });
  card.append(img, list, Object.assign(document.createElement("div"), { className: "buttons" }));
  card.lastChild.append(reuse, download);
  if (first) $("gallery").prepend(card); else $("gallery").append(card);
  const blob = await (await api(image.url)).blob(); // fetched, so that the token is sent
  img.src = download.href = URL.createObjectURL(blob);
}

function useParameters(p) {
  for (const key of ["prompt", "negative_prompt", "width", "height", "steps", "guidance", "seed"]) {
    if (p[key] !== undefined) $(key).value = p[key];
  }
  if (p.model && [...$("model").options].some((o) => o.value === p.model)) $("model").value = p.model;
  // loras: the --lora values that made it, paths on the server: the file names are what a request gives
  $("lora").value = p.loras ? JSON.parse(p.loras).map((l) => l.split("/").pop()).join(", ") : "";
  $("n").value = 1;
  $("random-seed").checked = false;
  $("prompt").focus();
  window.scrollTo({ top: 0, behavior: "smooth" });
}

async function loadGallery() {
  for (const image of await json("/api/images")) addCard(image, false);
}

async function start() {
  $("form").addEventListener("submit", submit);
  $("model").addEventListener("change", showDefaults);
  $("seed").addEventListener("input", () => { $("random-seed").checked = $("seed").value === ""; });
  $("cancel").addEventListener("click", () => current && api(`/api/jobs/${current}`, { method: "DELETE" }));
  $("token-save").addEventListener("click", () => {
    token = $("token").value.trim();
    localStorage.setItem("tiny-imagegen-token", token);
    $("token-row").hidden = true;
    boot();
  });
  boot();
}

async function boot() {
  try {
    await loadModels();
    await loadGallery();
  } catch (e) {
    $("form-error").textContent = e.message;
    $("form-error").hidden = false;
  }
}

start();
