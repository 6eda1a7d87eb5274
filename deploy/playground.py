"""The playground page at `/`: pick a subject, type a prompt, see the images.

Picking a subject shows, next to the prompt, what it is (token, class noun, training),
its training photos (thumbnails, GET /v1/subjects/{id}/photos/{n}) and the sample
images the pipeline made after training it (GET /v1/subjects/{id}/samples/{n}).
Strength slider (0: the untuned base, 1: the subject), several images at once, and
the facts of the batch each answer rode in (images, distinct subjects, replica, scale
set loaded or cached), kept as a list of answers.

One self-contained HTML page (no external scripts, styles or fonts: it works on a
machine without internet), talking to the JSON API with fetch(). The server fills in
its root path (Serve's route prefix) and the request bounds.
"""

from __future__ import annotations

import html
import json

from .params import MAX_SEED, MAX_STRENGTH, Limits

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>TuneQDM playground</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 62rem;
         padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; }
  label { display: block; margin: .6rem 0 .2rem; font-weight: 600; }
  input, select, button { font: inherit; padding: .3rem; }
  #prompt { width: 100%; box-sizing: border-box; }
  .row { display: flex; gap: 1rem; flex-wrap: wrap; }
  .row > div { flex: 1; min-width: 7rem; }
  .row input { width: 100%; box-sizing: border-box; }
  button { margin-top: 1rem; padding: .4rem 1.2rem; }
  #status { margin-top: 1rem; min-height: 1.4rem; }
  #status.error { color: #b00020; }
  #result, #gallery img { margin-top: 1rem; image-rendering: pixelated;
            border: 1px solid #ccc; min-width: 128px; }
  #gallery { display: flex; gap: .5rem; flex-wrap: wrap; }
  small { color: #666; }
  #layout { display: flex; gap: 2rem; flex-wrap: wrap; }
  #controls { flex: 3; min-width: 20rem; }
  #subject-card { flex: 2; min-width: 14rem; }
  #photos img, #samples img { width: 96px; margin: 0 .3rem .3rem 0; image-rendering: pixelated;
                 border: 1px solid #ccc; }
  #history { padding-left: 1.2rem; font-size: .9rem; }
</style>
</head>
<body>
<h1>TuneQDM playground</h1>
<p><small>Every subject is a small set of quantization scales on one shared quantized
base (<span id="base">...</span>). <code>{token}</code> and <code>{class_noun}</code>
in the prompt name the subject.</small></p>
<div id="layout">
<div id="controls">
<label for="subject">Subject</label>
<select id="subject"><option value="">loading...</option></select>
<label for="prompt">Prompt</label>
<input id="prompt" maxlength="__MAX_PROMPT__" value="a photo of {token} {class_noun}">
<label for="negative">Negative prompt</label>
<input id="negative" maxlength="__MAX_PROMPT__" value="" style="width:100%">
<div class="row">
  <div><label for="steps">Steps</label>
    <input id="steps" type="number" min="1" max="__MAX_STEPS__" value="__STEPS__"></div>
  <div><label for="guidance">Guidance</label>
    <input id="guidance" type="number" min="0" max="__MAX_GUIDANCE__" step="0.5"
           value="__GUIDANCE__"></div>
  <div><label for="size">Size (px)</label>
    <input id="size" type="number" min="__MIN_SIDE__" max="__MAX_SIDE__"
           step="__SIDE_STEP__" value="__SIZE__"></div>
  <div><label for="seed">Seed</label>
    <input id="seed" type="number" min="0" max="__MAX_SEED__" placeholder="random"></div>
  <div><label for="count">Images</label>
    <input id="count" type="number" min="1" max="__MAX_IMAGES__" value="1"></div>
</div>
<label for="strength">Strength <output id="strength-value">1</output>
  <small>(0: the untuned base, 1: the subject)</small></label>
<input id="strength" type="range" min="0" max="__MAX_STRENGTH__" step="0.05" value="1"
       style="width:100%">
<button id="generate" type="button">Generate</button>
</div>
<div id="subject-card">
<h2 style="font-size:1.1rem">About this subject</h2>
<p id="subject-facts"><small>Pick a subject.</small></p>
<div id="photos"></div>
<div id="samples"></div>
<p id="photos-note"><small></small></p>
</div>
</div>
<div id="status" role="status"></div>
<div id="gallery"><img id="result" alt="generated image" hidden></div>
<ol id="history"></ol>
<script>
const ROOT = __ROOT__;
const $ = (id) => document.getElementById(id);
const SUBJECTS = new Map();  // subject id -> its listing entry
const SHOWN_SAMPLES = 8;  // at most this many sample images beside the prompt
function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}
async function errorText(response) {
  try { const body = await response.json(); return body.error || JSON.stringify(body); }
  catch (e) { return response.statusText; }
}
async function loadSubjects() {
  try {
    const [health, listing] = await Promise.all([
      fetch(ROOT + "/healthz").then((r) => r.json()),
      fetch(ROOT + "/v1/subjects?limit=1000").then((r) => r.json())]);
    $("base").textContent = health.base.address + ", " + health.base.quant_config.bits +
      "-bit " + health.base.quant_config.method;
    const select = $("subject");
    select.innerHTML = "";
    for (const s of listing.subjects.filter((s) => s.servable)) {
      SUBJECTS.set(s.subject_id, s);
      const option = document.createElement("option");
      option.value = s.subject_id;
      option.textContent = s.subject_id + " (" + s.token + " " + s.class_noun + ")";
      select.appendChild(option);
    }
    if (!select.options.length) {
      select.innerHTML = '<option value="">no subjects</option>';
      setStatus("No finished subjects for this base yet.", true);
    } else {
      setStatus(select.options.length + " subject(s) ready.", false);
      showSubject();
    }
  } catch (e) { setStatus("Cannot reach the service: " + e, true); }
}
function showSubject() {
  const s = SUBJECTS.get($("subject").value);
  const samples = $("samples"), photos = $("photos");
  samples.innerHTML = "";
  photos.innerHTML = "";
  if (!s) return;
  $("subject-facts").textContent = s.token + " " + s.class_noun + ": " + s.method + ", " +
    s.bits + "-bit, " + s.num_experts + " expert(s), trained " + (s.trained_at || "?") +
    (s.steps ? " in " + s.steps + " steps" : "") + '; prompt "' + s.instance_prompt + '"';
  for (let index = 0; index < Math.min(s.photos, SHOWN_SAMPLES); index++) {
    const image = document.createElement("img");
    image.src = ROOT + "/v1/subjects/" + encodeURIComponent(s.subject_id) + "/photos/" +
                index;
    image.alt = "training photo " + (index + 1) + " of " + s.subject_id;
    image.title = "training photo " + (index + 1);
    photos.appendChild(image);
  }
  for (let index = 0; index < Math.min(s.samples, SHOWN_SAMPLES); index++) {
    const image = document.createElement("img");
    image.src = ROOT + "/v1/subjects/" + encodeURIComponent(s.subject_id) + "/samples/" +
                index;
    image.alt = "sample " + (index + 1) + " of " + s.subject_id;
    image.title = "sample " + (index + 1) + ", made after training";
    samples.appendChild(image);
  }
  $("photos-note").firstElementChild.textContent =
    (s.samples ? s.samples + " sample(s) made after training" +
     (s.samples > SHOWN_SAMPLES ? " (the first " + SHOWN_SAMPLES + " shown). " : ". ")
     : "No samples stored. ") +
    "Trained on " + s.training_photos + " photo(s)" +
    (s.photos ? " (above, as thumbnails)." : "; no thumbnails of them are stored.");
}
function recordAnswer(text) {
  const item = document.createElement("li");
  item.textContent = text;
  $("history").prepend(item);
}
async function generate() {
  const subject = $("subject").value;
  if (!subject) { setStatus("Pick a subject first.", true); return; }
  const size = Number($("size").value);
  const body = { prompt: $("prompt").value, num_inference_steps: Number($("steps").value),
                 guidance_scale: Number($("guidance").value), height: size, width: size,
                 num_images: Number($("count").value), strength: Number($("strength").value) };
  if ($("negative").value) body.negative_prompt = $("negative").value;
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  $("generate").disabled = true;
  setStatus("Generating...", false);
  const started = performance.now();
  try {
    const response = await fetch(ROOT + "/v1/subjects/" + encodeURIComponent(subject) +
                                 "/images", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Accept": "application/json" },
      body: JSON.stringify(body) });
    if (!response.ok) {
      setStatus("Error " + response.status + ": " + await errorText(response), true);
      return;
    }
    const answer = await response.json();
    for (const old of document.querySelectorAll("#gallery img.extra")) old.remove();
    answer.images.forEach((item, index) => {
      let image = $("result");
      if (index > 0) {
        image = document.createElement("img");
        image.className = "extra";
        image.alt = "generated image " + (index + 1);
        $("gallery").appendChild(image);
      }
      image.src = "data:image/png;base64," + item.png_base64;
      image.width = Math.max(256, size);
      image.title = "seed " + item.seed;
      image.dataset.seed = item.seed;
      image.hidden = false;
    });
    const ms = Math.round(performance.now() - started);
    let facts = "";
    if (answer.batch_images !== undefined) {
      facts = "; batch: " + answer.batch_images + " image(s), " + answer.batch_subjects +
              " subject(s)";
      if (answer.replica) facts += ", replica " + answer.replica;
      if (answer.scale_set) facts += ", scale set " + answer.scale_set;
    }
    setStatus("seed " + answer.seed + ", " + ms + " ms" + facts, false);
    recordAnswer(subject + ", strength " + body.strength + ", " + answer.images.length +
                 " image(s), seed " + answer.seed + ", " + ms + " ms" + facts);
  } catch (e) {
    setStatus("Request failed: " + e, true);
  } finally {
    $("generate").disabled = false;
  }
}
$("generate").addEventListener("click", generate);
$("subject").addEventListener("change", showSubject);
$("strength").addEventListener("input", () => {
  $("strength-value").textContent = $("strength").value; });
loadSubjects();
</script>
</body>
</html>
"""


def playground_html(root_path: str, limits: Limits, native_size: int) -> str:
    """The page, with `root_path` (Serve's route prefix, "" at /) and the bounds."""
    size = min(max(native_size, limits.min_side), limits.max_side)
    values = {
        "__ROOT__": json.dumps(root_path.rstrip("/")).replace("<", "\\u003c"),
        "__MAX_PROMPT__": str(limits.max_prompt_chars),
        "__MAX_STEPS__": str(limits.max_steps),
        "__STEPS__": str(limits.default_steps),
        "__MAX_GUIDANCE__": html.escape(str(limits.max_guidance)),
        "__GUIDANCE__": html.escape(str(limits.default_guidance)),
        "__MIN_SIDE__": str(limits.min_side),
        "__MAX_SIDE__": str(limits.max_side),
        "__SIDE_STEP__": str(limits.side_multiple),
        "__SIZE__": str(size),
        "__MAX_SEED__": str(MAX_SEED),
        "__MAX_IMAGES__": str(limits.max_images),
        "__MAX_STRENGTH__": str(MAX_STRENGTH),
    }
    page = _PAGE
    for placeholder, value in values.items():
        page = page.replace(placeholder, value)
    return page
