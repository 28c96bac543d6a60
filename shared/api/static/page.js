// The page's client: it streams POST /v1/generate as NDJSON and shows every event as it comes.
// Cancel aborts the fetch; the server sees the disconnect and stops that request's denoising.
"use strict";

const $ = (id) => document.getElementById(id);
let controller = null;

async function loadModels() {
  const response = await fetch("v1/models");
  const body = await response.json();
  for (const card of body.data || []) {
    const option = document.createElement("option");
    option.value = option.textContent = card.id;
    $("model").append(option);
  }
}

function request() {
  const body = { model: $("model").value, prompt: $("prompt").value, stream: true,
                 preview: $("preview").value };
  if ($("negative").value) body.negative_prompt = $("negative").value;
  for (const name of ["width", "height", "steps", "seed"]) {
    if ($(name).value !== "") body[name] = Number($(name).value);
  }
  return body;
}

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
    $("status").textContent = `error: ${event.error.code}: ${event.error.message}`;
  }
}

async function generate(submit) {
  submit.preventDefault();
  controller = new AbortController();
  const id = `page-${crypto.randomUUID()}`;
  document.body.dataset.requestId = id;
  $("start").disabled = true;
  $("cancel").disabled = false;
  $("status").textContent = "sending";
  try {
    const response = await fetch("v1/generate", {
      method: "POST", body: JSON.stringify(request()), signal: controller.signal,
      headers: { "content-type": "application/json", "x-request-id": id },
    });
    if (!response.ok) {
      const error = (await response.json()).error;
      $("status").textContent = `error: ${error.code}: ${error.message}`;
      return;
    }
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
  } catch (error) {
    $("status").textContent = error.name === "AbortError" ? "cancelled" : `error: ${error}`;
  } finally {
    $("start").disabled = false;
    $("cancel").disabled = true;
    controller = null;
  }
}

$("generate").addEventListener("submit", generate);
$("cancel").addEventListener("click", () => controller && controller.abort());
loadModels();
