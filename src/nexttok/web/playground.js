// The page asks the server for everything it shows: no sampling stage is computed here.
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];  // earlier prompts, for undo

async function call(path, body) {
  let r;
  try {
    r = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  } catch (e) {
    throw new Error("the server went away; start `nexttok serve` again and retry");
  }
  const data = await r.json();
  if (!r.ok) throw new Error(data.error ? `${data.error.param ? data.error.param + ": " : ""}${data.error.message}` : r.statusText);
  return data;
}

function settings() {
  return { temperature: +$("temperature").value, top_k: +$("top_k").value, top_p: +$("top_p").value, min_p: +$("min_p").value };
}

function shown(text) { return text.replaceAll(" ", "␣").replaceAll("\n", "↵").replaceAll("\t", "⇥"); }

function render(data) {
  const bars = $("bars");
  bars.replaceChildren();
  const best = data.candidates[0].prob;
  for (const c of data.candidates) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.className = c.kept ? "kept" : "removed";
    b.dataset.id = c.id;
    b.dataset.text = c.text;
    b.setAttribute("aria-label", `append ${shown(c.text)}, probability ${c.prob.toFixed(4)}`);
    b.innerHTML = `<span class="token"></span><span class="bar" style="width:${Math.max(1, 100 * c.prob / best)}%"></span>` +
      `<span class="prob">${c.prob.toFixed(4)}</span>`;
    b.querySelector(".token").textContent = `${c.rank}. ${shown(c.text)}`;
    b.title = `logprob ${Math.log(c.prob).toFixed(3)} · after the stages ${c.final_prob.toFixed(4)}`;
    b.addEventListener("click", () => append(c.text));
    li.append(b);
    bars.append(li);
  }
  const last = data.stages[data.stages.length - 1];
  $("summary").textContent = `entropy after the stages ${last.entropy.toFixed(3)} nats · ${last.survivors} tokens survive · ` +
    data.stages.map((s) => `${s.name}: ${s.survivors}`).join(", ");
  $("summary").dataset.entropy = last.entropy;
}

let latest = 0;  // a slider fires many requests: only the newest answer is drawn

async function refresh() {
  $("error").textContent = "";
  const mine = ++latest;
  try {
    const data = await call("/v1/stages", { prompt: $("prompt").value, top: +$("k").value, ...settings() });
    if (mine !== latest) return;
    render(data);
    document.body.dataset.rendered = String(mine);
    return data;
  } catch (e) {
    $("error").textContent = e.message;
  }
}

function append(text) {
  history.push($("prompt").value);
  $("prompt").value += text;
  $("undo").disabled = false;
  $("draw").textContent = "";
  return refresh();
}

async function sample() {
  $("error").textContent = "";
  try {
    const data = await call("/v1/stages", { prompt: $("prompt").value, top: +$("k").value, seed: +$("seed").value, ...settings() });
    const s = data.sample;
    $("draw").textContent = `seed ${s.seed}: u = ${s.uniform === null ? "greedy" : s.uniform.toFixed(4)} fell in ` +
      `[${s.cdf_before.toFixed(4)}, ${s.cdf_after.toFixed(4)}) → ${shown(s.text)} (p ${s.prob.toFixed(4)})`;
    $("draw").dataset.id = s.id;
    $("draw").dataset.text = s.text;
  } catch (e) {
    $("error").textContent = e.message;
  }
}

async function find() {
  $("error").textContent = "";
  try {
    const r = await call("/v1/next_token", { prompt: $("prompt").value, top: 1, tokens: [$("search").value] });
    const q = r.distributions[0].tokens[0];
    $("found").textContent = `${shown(q.query)}: p = ${q.prob.toPrecision(3)}, rank ${q.rank} of ${r.vocab_size}` +
      (q.ids.length > 1 ? ` (first of ${q.ids.length} tokens; whole word p = ${q.word_prob.toPrecision(3)})` : "");
  } catch (e) {
    $("error").textContent = e.message;
  }
}

async function colour() {
  $("error").textContent = "";
  try {
    const r = await call("/v1/ranks", { prompt: $("prompt").value, top: 5 });
    const out = $("coloured");
    out.replaceChildren();
    for (const t of r.tokens) {
      const span = document.createElement("span");
      span.textContent = t.text;
      span.className = t.bucket || "first";
      span.tabIndex = 0;
      const alts = t.top.map((a) => `${shown(a.text)} ${a.prob.toFixed(3)}`).join("  ");
      span.title = t.rank ? `rank ${t.rank}, p ${t.prob.toFixed(4)}; the model expected: ${alts}` : "the first token";
      const tell = () => { $("alternatives").textContent = `${shown(t.text)}: ${span.title}`; };
      span.addEventListener("mouseenter", tell);
      span.addEventListener("focus", tell);
      out.append(span);
    }
    out.dataset.buckets = JSON.stringify(r.buckets);
  } catch (e) {
    $("error").textContent = e.message;
  }
}

$("predict").addEventListener("click", refresh);
$("colour").addEventListener("click", colour);
$("sample").addEventListener("click", sample);
$("find").addEventListener("click", find);
$("undo").addEventListener("click", () => {
  $("prompt").value = history.pop();
  $("undo").disabled = history.length === 0;
  refresh();
});
for (const id of ["temperature", "top_p", "min_p", "top_k", "k"]) {
  $(id).addEventListener("input", () => {
    const out = document.querySelector(`output[for=${id}]`);
    if (out) out.textContent = $(id).value;
    refresh();
  });
}
refresh();
