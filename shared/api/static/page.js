// The page's client: it builds a GenerateRequest from the form (text, image or inpaint mode, plus
// the optional start image, noise mask and image prompt), streams POST /v1/generate as NDJSON and
// shows every event as it comes. Cancel aborts the fetch; the server sees the disconnect and stops
// that request's denoising. Uploads are sent as the data URLs FileReader makes: the server decodes,
// checks and resizes them, and its 4xx names the field (`param`) to show the message next to.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "diffusion-serve.api-key";
const uploads = {}; // file input id -> data URL of the chosen file
const mask = { canvas: $("mask-canvas"), last: null, painted: false };
let controller = null;

// ---- the API key and every call to the API ---------------------------------------------------

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

// Every call goes through here, so none can forget the key, and any 401 asks for one.
async function api(path, options = {}) {
  const headers = { ...options.headers };
  if (apiKey()) headers.authorization = `Bearer ${apiKey()}`;
  const response = await fetch(path, { ...options, headers });
  showAuthProblem(response.status === 401);
  return response;
}

function showAuthProblem(refused) {
  const message = !refused ? "" : apiKey()
    ? "The server refused this API key. Check it, then press Save key."
    : "This server needs an API key: enter it above and press Save key.";
  $("auth-message").textContent = message;
  $("api-key").toggleAttribute("aria-invalid", refused);
}

function saveKey(submit) {
  submit.preventDefault();
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  loadCatalogs();
}

// ---- what the server offers: models and noise-mask patterns ----------------------------------

async function loadCatalogs() {
  try {
    await Promise.all([loadModels(), loadNoiseMasks()]);
  } catch (error) {
    $("status").textContent = `cannot reach the server: ${error}`;
  }
}

async function loadModels() {
  const response = await api("v1/models");
  if (!response.ok) return;
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren();
  for (const card of (await response.json()).data || []) {
    const option = document.createElement("option");
    option.value = option.textContent = card.id;
    select.append(option);
  }
  if (chosen) select.value = chosen;
}

async function loadNoiseMasks() {
  const response = await api("v1/noise-masks");
  if (!response.ok) return;
  const group = $("noise-patterns");
  const chosen = noisePattern();
  group.querySelectorAll("label[data-pattern]").forEach((label) => label.remove());
  for (const pattern of (await response.json()).data || []) group.append(patternChoice(pattern));
  const again = group.querySelector(`input[value="${CSS.escape(chosen)}"]`);
  if (again) again.checked = true;
}

function patternChoice(pattern) {
  const label = document.createElement("label");
  label.dataset.pattern = pattern.name;
  label.title = pattern.description;
  const input = Object.assign(document.createElement("input"), {
    type: "radio", name: "noise-pattern", value: pattern.name,
  });
  // The thumbnail repeats the name next to it, so it is decorative for screen readers.
  const thumbnail = Object.assign(document.createElement("img"), {
    src: `data:image/png;base64,${pattern.preview}`, alt: "", width: 32, height: 32,
  });
  label.append(input, thumbnail, pattern.name.replace("_", " "));
  return label;
}

function noisePattern() {
  return document.querySelector('input[name="noise-pattern"]:checked').value;
}

// ---- modes -----------------------------------------------------------------------------------

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function showMode() {
  const current = mode();
  document.body.dataset.mode = current;
  for (const element of document.querySelectorAll("[data-modes]")) {
    element.hidden = !element.dataset.modes.split(" ").includes(current);
  }
  // Until the user moves it, the slider shows the server's default strength for the mode.
  if (!$("strength").dataset.touched) {
    $("strength").value = current === "inpaint" ? 1 : 0.8;
    showValue($("strength"));
  }
  // With an init image the server takes the image's size for the sides left empty.
  $("width").placeholder = $("height").placeholder = current === "text" ? "model's" : "image's";
}

function showValue(range) {
  range.nextElementSibling.value = range.value;
}

// ---- uploads ---------------------------------------------------------------------------------

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// A file input's id is its request field with dashes: init-image -> init_image.
const paramOf = (input) => input.id.replaceAll("-", "_");

async function upload(change) {
  const input = change.target;
  clearError(paramOf(input));
  const file = input.files[0];
  delete uploads[input.id];
  try {
    if (file) uploads[input.id] = await readAsDataURL(file);
  } catch (error) {
    showError({ code: "unreadable_file", message: `cannot read ${file.name}: ${error}`,
                param: paramOf(input) });
  }
  if (input.id === "init-image") showInitImage(uploads[input.id]);
}

function removeUpload(click) {
  const input = $(click.target.dataset.remove);
  input.value = "";
  delete uploads[input.id];
  clearError(paramOf(input));
}

function showInitImage(url) {
  const image = $("init-preview");
  image.onload = () => {
    sizeMask(image.naturalWidth, image.naturalHeight);
    $("paint").hidden = false;
  };
  // An image the browser cannot show is still sent: the server's answer says what is wrong.
  image.onerror = () => {
    $("paint").hidden = true;
  };
  if (url) image.src = url;
  else $("paint").hidden = true;
}

// ---- the inpainting mask ---------------------------------------------------------------------

// The canvas has the image's own pixel size (the server wants the mask at the init image's
// size); CSS stretches it over the preview, so pointer positions are scaled into it.
function sizeMask(width, height) {
  mask.canvas.width = width; // resizing also clears it
  mask.canvas.height = height;
  mask.painted = false;
}

function canvasPoint(event) {
  const rect = mask.canvas.getBoundingClientRect();
  const scale = mask.canvas.width / rect.width;
  return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * scale, scale };
}

function paintTo(point) {
  const context = mask.canvas.getContext("2d");
  // The brush size is in screen pixels, so it feels the same whatever the image's resolution.
  const radius = (Number($("brush").value) * point.scale) / 2;
  const from = mask.last || point;
  context.fillStyle = context.strokeStyle = "#fff";
  context.lineWidth = radius * 2;
  context.lineCap = "round";
  context.beginPath();
  context.moveTo(from.x, from.y);
  context.lineTo(point.x, point.y);
  context.stroke();
  // A zero-length line draws nothing, so a single tap gets its own dot.
  context.beginPath();
  context.arc(point.x, point.y, radius, 0, 2 * Math.PI);
  context.fill();
  mask.last = point;
  mask.painted = true;
}

function startStroke(event) {
  mask.canvas.setPointerCapture(event.pointerId);
  mask.last = null;
  paintTo(canvasPoint(event));
  clearError("mask");
}

function fillMask(white) {
  const context = mask.canvas.getContext("2d");
  context.clearRect(0, 0, mask.canvas.width, mask.canvas.height);
  if (white) {
    context.fillStyle = "#fff";
    context.fillRect(0, 0, mask.canvas.width, mask.canvas.height);
  }
  mask.painted = white;
}

// The canvas holds white strokes on transparency so the image shows through; the server wants
// an opaque mask, black = keep.
function maskDataURL() {
  const out = document.createElement("canvas");
  out.width = mask.canvas.width;
  out.height = mask.canvas.height;
  const context = out.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, out.width, out.height);
  context.drawImage(mask.canvas, 0, 0);
  return out.toDataURL("image/png");
}

// ---- the request -----------------------------------------------------------------------------

function request() {
  const body = { model: $("model").value, prompt: $("prompt").value, stream: true,
                 preview: $("preview").value };
  if ($("negative").value) body.negative_prompt = $("negative").value;
  for (const name of ["width", "height", "steps", "seed"]) {
    if ($(name).value !== "") body[name] = Number($(name).value);
  }
  return { ...body, ...sourceImage(), ...startImage(), ...noiseMask(), ...imagePrompt() };
}

function sourceImage() {
  if (mode() === "text") return {};
  if (!uploads["init-image"]) throw fieldProblem("init_image", "choose an image to start from");
  const fields = { init_image: uploads["init-image"], strength: Number($("strength").value) };
  if (mode() === "inpaint") {
    if (!mask.painted) throw fieldProblem("mask", "paint the area to repaint (or press Fill)");
    fields.mask = maskDataURL();
    fields.mask_blur = Number($("mask-blur").value || 0);
  }
  return fields;
}

// The server refuses a start image next to an init image, so it only goes with text mode.
function startImage() {
  if (mode() !== "text" || !uploads["start-image"]) return {};
  return { start_image: uploads["start-image"], start_noise: Number($("start-noise").value) };
}

function noiseMask() {
  if (!noisePattern()) return {};
  return { noise_mask: {
    pattern: noisePattern(), strength: Number($("noise-strength").value),
    start: Number($("noise-start").value), end: Number($("noise-end").value),
    invert: $("noise-invert").checked,
  } };
}

function imagePrompt() {
  if (!uploads["image-prompt"]) return {};
  return { image_prompt: uploads["image-prompt"],
           image_prompt_scale: Number($("image-prompt-scale").value) };
}

// ---- errors next to their fields -------------------------------------------------------------

function fieldProblem(param, message) {
  return Object.assign(new Error(message), { body: { code: "invalid_value", message, param } });
}

// A param like "noise_mask.start" has no place of its own: it shows at its parent's.
function errorPlace(param) {
  for (let name = param; name; name = name.slice(0, Math.max(0, name.lastIndexOf(".")))) {
    const place = document.querySelector(`[data-error-for~="${CSS.escape(name)}"]`);
    if (place) return place;
  }
  return null;
}

function showError(error) {
  $("status").textContent = `error: ${error.code}: ${error.message}`;
  const place = error.param && errorPlace(error.param);
  if (!place) return;
  place.textContent = error.message;
  const details = place.closest("details");
  if (details) details.open = true;
}

function clearError(param) {
  const place = errorPlace(param);
  if (place) place.textContent = "";
}

function clearErrors() {
  for (const place of document.querySelectorAll("[data-error-for]")) place.textContent = "";
}

async function errorOf(response) {
  try {
    return (await response.json()).error;
  } catch {
    return { code: `http_${response.status}`, message: response.statusText };
  }
}

// ---- generating ------------------------------------------------------------------------------

function show(event) {
  if (event.event === "queued") {
    const eta = event.eta_ms == null ? "" : `, about ${(event.eta_ms / 1000).toFixed(1)} s`;
    $("status").textContent = `queued (position ${event.position}${eta})`;
  } else if (event.event === "step") {
    $("status").textContent = `step ${event.index} of ${event.total}`;
    $("step").textContent = `step ${event.index} of ${event.total}, ${event.step_ms.toFixed(0)} ms`;
    const preview = event.previews[0];
    if (preview) $("preview-image").src = `data:image/${preview.format};base64,${preview.b64}`;
  } else if (event.event === "result") {
    const image = event.images[0];
    $("result-image").src = `data:image/${image.format};base64,${image.b64}`;
    const t = event.timings;
    $("result").textContent = `seed ${image.seed}, ${image.width}x${image.height}, ` +
      `${t.total_ms.toFixed(0)} ms (queue ${t.queue_ms.toFixed(0)}, denoise ${t.denoise_ms.toFixed(0)})`;
    $("status").textContent = "done";
  } else if (event.event === "error") {
    showError(event.error);
  }
}

async function readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, newline).trim();
      buffered = buffered.slice(newline + 1);
      if (line) show(JSON.parse(line));
    }
  }
}

async function generate(submit) {
  submit.preventDefault();
  clearErrors();
  let body;
  try {
    body = request();
  } catch (problem) {
    showError(problem.body);
    return;
  }
  controller = new AbortController();
  const id = `page-${crypto.randomUUID()}`;
  document.body.dataset.requestId = id;
  $("start").disabled = true;
  $("cancel").disabled = false;
  $("status").textContent = "sending";
  try {
    const response = await api("v1/generate", {
      method: "POST", body: JSON.stringify(body), signal: controller.signal,
      headers: { "content-type": "application/json", "x-request-id": id },
    });
    if (response.ok) await readEvents(response);
    else showError(await errorOf(response));
  } catch (error) {
    $("status").textContent = error.name === "AbortError" ? "cancelled" : `error: ${error}`;
  } finally {
    $("start").disabled = false;
    $("cancel").disabled = true;
    controller = null;
  }
}

// ---- wiring ----------------------------------------------------------------------------------

$("generate").addEventListener("submit", generate);
$("cancel").addEventListener("click", () => controller && controller.abort());
$("auth").addEventListener("submit", saveKey);
for (const radio of document.querySelectorAll('input[name="mode"]')) {
  radio.addEventListener("change", showMode);
}
for (const range of document.querySelectorAll('input[type="range"]')) {
  range.addEventListener("input", () => { range.dataset.touched = "yes"; showValue(range); });
  showValue(range);
}
for (const input of document.querySelectorAll('input[type="file"]')) {
  input.addEventListener("change", upload);
}
for (const button of document.querySelectorAll("[data-remove]")) {
  button.addEventListener("click", removeUpload);
}
mask.canvas.addEventListener("pointerdown", startStroke);
mask.canvas.addEventListener("pointermove", (event) => mask.last && paintTo(canvasPoint(event)));
for (const type of ["pointerup", "pointercancel"]) {
  mask.canvas.addEventListener(type, () => { mask.last = null; });
}
$("fill-mask").addEventListener("click", () => fillMask(true));
$("clear-mask").addEventListener("click", () => fillMask(false));
$("api-key").value = apiKey();
showMode();
loadCatalogs();
