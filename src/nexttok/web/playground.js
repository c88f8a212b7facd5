// The page asks the server for everything it shows: no sampling stage is computed here.
// State: the context is a list of token ids (what the model reads), so a clicked token is appended as that
// token, never re-tokenized; editing the prompt box starts a new context.
"use strict";
const $ = (id) => document.getElementById(id);
const STAGES = ["temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "presence_penalty",
  "frequency_penalty"];
const PROMPT_FIELDS = { prompt: "prompt", messages: "prompt", ids: "prompt" };

// The current point of the loop: ids, the steps that led here from the prompt, the prompt box's text.
let ctx = { ids: null, steps: [], box: null, chat: false, promptLength: 0, text: "" };
const undos = [];          // earlier points, for undo
const branches = new Map(); // every point visited, by its ids
let last = null;            // the newest /v1/stages answer
let latest = 0;             // a slider fires many requests: only the newest answer is drawn
let down = false;

// --- talking to the server ----------------------------------------------------------------------------------

async function call(path, body, fields = {}) {
  let r;
  try {
    r = await fetch(path, body === undefined ? {} :
      { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  } catch (e) {
    wentAway();
    throw new Error("the server went away; the page reconnects when it is back (start `nexttok serve` again)");
  }
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const err = data.error || { message: `${r.status} ${r.statusText}` };
    const e = new Error(`${err.param ? err.param + ": " : ""}${err.message}`);
    e.field = fields[err.param] || PROMPT_FIELDS[err.param] || err.param;
    throw e;
  }
  return data;
}

function wentAway() {
  if (down) return;
  down = true;
  document.body.dataset.server = "down";
  $("status").textContent = "The server went away: waiting for it to come back…";
  const poll = async () => {
    try {
      const r = await fetch("/health");
      if (r.ok) return back();
      $("status").textContent = "The server is back and still loading its model…";
    } catch (e) { /* still away */ }
    setTimeout(poll, 1000);
  };
  setTimeout(poll, 1000);
}

async function back() {
  down = false;
  document.body.dataset.server = "up";
  $("status").textContent = "";
  await models();
  refresh();
}

function clearErrors() {
  $("error").textContent = "";
  for (const e of document.querySelectorAll(".field-error")) e.remove();
}

// One readable line: under the controls, and beside the field it concerns.
function fail(e) {
  $("error").textContent = e.message;
  const field = e.field && $(e.field);
  if (!field) return;
  const note = document.createElement("span");
  note.className = "field-error";
  note.textContent = e.message;
  (field.closest("label") || field).after(note);
}

function guarded(fn) {
  return async (...args) => {
    clearErrors();
    try { return await fn(...args); } catch (e) { fail(e); }
  };
}

function settings() {
  return Object.fromEntries(STAGES.map((s) => [s, +$(s).value]));
}

function model() { return $("model").value; }

function shown(text) { return text.replaceAll(" ", "␣").replaceAll("\n", "↵").replaceAll("\t", "⇥"); }

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, props);
  e.append(...children);
  return e;
}

// --- the context ------------------------------------------------------------------------------------------

async function models() {
  const list = (await call("/v1/models")).data.map((m) => m.id);
  for (const id of ["model", "model-a", "model-b"]) {
    const keep = $(id).value;
    $(id).replaceChildren(...list.map((m) => el("option", { value: m, textContent: m })));
    if (list.includes(keep)) $(id).value = keep;
  }
  if (!list.includes($("model-b").value) || $("model-b").value === $("model-a").value) $("model-b").value = list[1] || list[0];
  $("model-row").hidden = list.length < 2;
  $("compare").hidden = list.length < 2;
}

// The ids of what the box says; a box edited since the context was made starts a new one.
async function context() {
  const chat = $("chat").checked;
  if (ctx.ids && ctx.box === $("prompt").value && ctx.chat === chat && ctx.model === model()) return ctx;
  const body = chat ? { messages: [{ role: "user", content: $("prompt").value }] } : { prompt: $("prompt").value };
  const r = await call("/tokenize", { model: model(), ...body });
  ctx = { ids: r.tokens.map((t) => t.id), steps: [], box: $("prompt").value, chat, model: model(), promptLength: r.count, text: r.text };
  undos.length = 0;
  branches.clear();
  $("undo").disabled = true;
  return ctx;
}

function snapshot() { return { ...ctx, ids: [...ctx.ids], steps: [...ctx.steps] }; }

function remember() { branches.set(ctx.ids.join(","), snapshot()); }

// Append token `id` as one step of the loop; `prob` is the model's, `alts` what else it expected.
function extend(id, text, prob, alts) {
  ctx.steps.push({ input: ctx.text, id, text, prob, alts });
  ctx.ids.push(id);
  ctx.text += text;
  if (!ctx.chat) {
    $("prompt").value += text;
    ctx.box = $("prompt").value;
  }
}

function restore(point) {
  ctx = { ...point, ids: [...point.ids], steps: [...point.steps] };
  $("prompt").value = ctx.box;
  $("chat").checked = ctx.chat;
}

function goTo(point) {
  restore(point);
  return refresh();
}

function step(id, text, prob, alts) {
  undos.push(snapshot());
  $("undo").disabled = false;
  extend(id, text, prob, alts);
  $("draw").textContent = "";
  $("draw-append").hidden = true;
  return refresh();
}

function alternativesOf(data, id) {
  return data.candidates.filter((c) => c.id !== id).slice(0, 3).map((c) => ({ text: c.text, prob: c.prob }));
}

// --- the distribution and the stages -----------------------------------------------------------------------

function render(data) {
  const best = data.candidates[0].prob;
  $("bars").replaceChildren(...data.candidates.map((c) => {
    const b = el("button", { className: c.kept ? "kept" : "removed" });
    b.dataset.id = c.id;
    b.dataset.text = c.text;
    b.setAttribute("aria-label", `append ${c.shown}, probability ${c.prob.toFixed(4)}, rank ${c.rank}`);
    b.append(el("span", { className: "token", textContent: `${c.rank}. ${c.shown}` }),
      el("span", { className: "bar", style: `width:${Math.max(1, 100 * c.prob / best)}%` }),
      el("span", { className: "prob", textContent: c.prob.toFixed(4) }),
      el("span", { className: "logprob", textContent: Math.log(c.prob).toFixed(2) }));
    b.title = `logprob ${Math.log(c.prob).toFixed(3)} · after the stages ${c.final_prob.toFixed(4)}`;
    b.addEventListener("click", () => step(c.id, c.text, c.prob, alternativesOf(data, c.id)));
    return el("li", {}, b);
  }));
  const end = data.stages[data.stages.length - 1];
  $("summary").textContent = `entropy ${data.entropy.toFixed(3)} nats; ${data.cover_90} tokens cover 90% · after the stages: ` +
    `entropy ${end.entropy.toFixed(3)}, ${end.survivors} tokens survive (` +
    data.stages.map((s) => `${s.name}: ${s.survivors}`).join(", ") + ")";
  $("summary").dataset.entropy = end.entropy;
  $("context").textContent = data.context;
  $("context-count").textContent = data.prompt_ids.length;
}

function showTrace() {
  $("trace").tBodies[0].replaceChildren(...ctx.steps.map((s, i) => el("tr", {},
    el("td", { textContent: i + 1 }), el("td", { className: "input", textContent: "…" + s.input.slice(-40) }),
    el("td", { className: "chosen", textContent: shown(s.text) }), el("td", { textContent: s.prob.toFixed(4) }),
    el("td", { textContent: s.alts.map((a) => `${shown(a.text)} ${a.prob.toFixed(3)}`).join("  ") }))));
}

function showBranches() {
  const here = ctx.ids.join(",");
  $("branches").replaceChildren(...[...branches.entries()].map(([key, point]) => {
    const b = el("button", { textContent: `${point.steps.length} steps: …${shown(point.text.slice(-30))}` });
    if (key === here) b.setAttribute("aria-current", "true");
    b.addEventListener("click", () => { undos.push(snapshot()); $("undo").disabled = false; goTo(point); });
    return el("li", {}, b);
  }));
}

async function refresh() {
  const mine = ++latest;
  try {
    await context();
    const data = await call("/v1/stages", { model: model(), ids: ctx.ids, top: +$("k").value, ...settings() }, { top: "k" });
    if (mine !== latest) return;
    clearErrors();
    last = data;
    ctx.text = data.context;
    remember();
    render(data);
    showTrace();
    showBranches();
    document.body.dataset.rendered = String(mine);
    return data;
  } catch (e) {
    if (mine === latest) { clearErrors(); fail(e); }
  }
}

// --- sampling ----------------------------------------------------------------------------------------------

let drawn = null;

async function sample() {
  await context();
  const data = await call("/v1/stages", { model: model(), ids: ctx.ids, top: +$("k").value, seed: +$("seed").value, ...settings() });
  const s = data.sample;
  drawn = { s, alts: alternativesOf(data, s.id) };
  $("draw").textContent = `seed ${s.seed}: u = ${s.uniform === null ? "greedy" : s.uniform.toFixed(4)} fell in ` +
    `[${s.cdf_before.toFixed(4)}, ${s.cdf_after.toFixed(4)}) of the cumulative bar → ${s.shown} (p after the stages ${s.prob.toFixed(4)})`;
  $("draw").dataset.id = s.id;
  $("draw").dataset.text = s.text;
  $("draw-append").hidden = false;
}

function completion(extra) {
  return { model: model(), prompt: ctx.ids, logprobs: 3, ...settings(), ...extra };
}

// Generated tokens as loop steps: the model's probability and its alternatives, from nexttok's extension.
function tokensOf(r, i) {
  const texts = r.choices[i].logprobs.tokens;
  return r.nexttok.choices[i].tokens.map((t, j) => ({ id: t.id, text: texts[j], prob: t.prob, rank: t.rank,
    alts: (t.alternatives || []).filter((a) => a.id !== t.id).map((a) => ({ text: a.text, prob: a.prob })) }));
}

async function run() {
  await context();
  const r = await call("/v1/completions", completion({ max_tokens: +$("steps").value, seed: +$("seed").value }),
    { max_tokens: "steps" });
  play(r, 0);
  $("run-info").textContent = `ran ${r.nexttok.choices[0].tokens.length} steps with seed ${r.nexttok.choices[0].seed}; ` +
    `finish: ${r.nexttok.choices[0].finish}`;
  return refresh();
}

function play(r, i) {
  undos.push(snapshot());
  $("undo").disabled = false;
  for (const t of tokensOf(r, i)) {
    extend(t.id, t.text, t.prob, t.alts);
    remember();
  }
}

// --- ask twice ---------------------------------------------------------------------------------------------

async function ask() {
  await context();
  const max = +$("ask-max").value;
  const r = await call("/v1/completions", completion({ n: +$("ask-n").value, max_tokens: max }),
    { n: "ask-n", max_tokens: "ask-max" });
  const base = snapshot();
  $("samples").replaceChildren(...r.choices.map((c, i) => card(r, i, base, max)));
}

function card(r, i, base, max) {
  const info = r.nexttok.choices[i];
  const total = r.choices[i].logprobs.token_logprobs.reduce((a, b) => a + b, 0);
  // With `serve --corpus`, tokens inside a verbatim span of the training corpus are underlined.
  const spans = info.corpus ? info.corpus.spans : [];
  const copied = (j) => spans.some((s) => s.start <= j && j < s.stop);
  const text = el("p", { className: "sample-text" }, ...tokensOf(r, i).map((t, j) =>
    el("span", { className: bucket(t.rank) + (copied(j) ? " verbatim" : ""), textContent: t.text,
      title: `rank ${t.rank}, p ${t.prob.toFixed(4)}` })));
  const replay = el("button", { textContent: "Replay" });
  const said = el("p", { className: "replayed" });
  replay.addEventListener("click", guarded(async () => {
    const again = await call("/v1/completions", completion({ prompt: base.ids, n: 1, max_tokens: max, seed: info.seed }));
    const same = again.choices[0].text === r.choices[i].text;
    said.textContent = `replayed with seed ${info.seed}: ${same ? "the same text" : "a different text"}; now in the loop above`;
    said.dataset.same = String(same);
    restore(base);
    play(again, 0);
    $("run-info").textContent = `replayed sample ${i + 1} (seed ${info.seed})`;
    await refresh();
  }));
  const c = el("article", { className: "sample" },
    el("h3", { textContent: `sample ${i + 1}` }),
    el("p", { className: "meta", textContent: `seed ${info.seed} · log P = ${total.toFixed(3)} · ${info.tokens.length} tokens · finish: ${info.finish}` }),
    text, ...verbatim(info.corpus), replay, said);
  c.dataset.seed = info.seed;
  c.dataset.logprob = total;
  return c;
}

function verbatim(corpus) {
  if (!corpus) return [];
  const where = corpus.spans.map((s) => `${JSON.stringify(s.text)} (${s.where.map((w) => w.name).join(", ")})`);
  const line = el("p", { className: "verbatim-info",
    textContent: `${(100 * corpus.coverage).toFixed(0)}% of the tokens in verbatim spans of >= ${corpus.min_span} ` +
      `tokens from the corpus${where.length ? ": " + where.join("; ") : ""}` });
  line.dataset.coverage = corpus.coverage;
  return [line];
}

function bucket(rank) {
  return rank <= 10 ? "top-10" : rank <= 100 ? "top-100" : rank <= 1000 ? "top-1000" : "beyond";
}

// --- colour, find, compare ---------------------------------------------------------------------------------

async function colour() {
  await context();
  const r = await call("/v1/ranks", { model: model(), ids: ctx.ids, top: 5 });
  const out = $("coloured");
  out.replaceChildren(...r.tokens.map((t, i) => {
    const span = el("span", { textContent: t.text, className: t.bucket || "first", tabIndex: 0 });
    if (i >= ctx.promptLength) span.dataset.part = "output";
    const alts = t.top.map((a) => `${a.shown} ${a.prob.toFixed(3)}`).join("  ");
    span.title = t.rank ? `rank ${t.rank}, p ${t.prob.toFixed(4)}; the model expected: ${alts}` : "the first token";
    const tell = () => { $("alternatives").textContent = `${t.shown}: ${span.title}`; };
    span.addEventListener("mouseenter", tell);
    span.addEventListener("focus", tell);
    return span;
  }));
  out.dataset.buckets = JSON.stringify(r.buckets);
}

let foundToken = null;

async function find() {
  await context();
  const r = await call("/v1/next_token", { model: model(), ids: ctx.ids, top: 1, tokens: [$("search").value] },
    { tokens: "search" });
  const q = r.distributions[0].tokens[0];
  $("found").textContent = `${shown(q.query)}: p = ${q.prob.toPrecision(3)}, rank ${q.rank.toLocaleString()} of ` +
    `${r.vocab_size.toLocaleString()}` +
    (q.ids.length > 1 ? ` for its first of ${q.ids.length} tokens (${q.pieces.map(shown).join(" + ")}); the whole word, ` +
      `by the chain rule: p = ${q.word_prob.toPrecision(3)}` : "");
  foundToken = q;
  $("find-append").hidden = false;
}

async function compare() {
  await context();
  const r = await call("/v1/compare", { a: $("model-a").value, b: $("model-b").value, ids: ctx.ids, top: +$("k").value },
    { a: "model-a", b: "model-b" });
  $("compare-summary").textContent = `KL(A‖B) = ${r.kl_ab_bits.toFixed(4)} bits · JS = ${r.js_bits.toFixed(4)} bits · ` +
    `entropy A ${r.entropy_a_bits.toFixed(3)}, B ${r.entropy_b_bits.toFixed(3)} bits · B's top token is A's #${r.b_top_rank_under_a}`;
  $("compare-summary").dataset.kl = r.kl_ab_nats;
  const bar = (p, cls) => el("span", { className: `pair ${cls}` },
    el("span", { className: "bar", style: `width:${Math.max(1, 100 * p)}%` }), el("span", { textContent: p.toFixed(4) }));
  $("compare-table").tBodies[0].replaceChildren(...r.candidates.map((c) => el("tr", {},
    el("td", { className: "token", textContent: c.shown }), el("td", {}, bar(c.prob_a, "a")), el("td", {}, bar(c.prob_b, "b")),
    el("td", { className: c.prob_b >= c.prob_a ? "gain" : "loss", textContent: (c.prob_b - c.prob_a).toFixed(4) }))));
  const list = (rows) => rows.map((c) => `${c.shown} ${(c.prob_b - c.prob_a) >= 0 ? "+" : ""}${(c.prob_b - c.prob_a).toFixed(4)}`).join("  ");
  $("moves").textContent = `gained most: ${list(r.gains) || "none"} · lost most: ${list(r.losses) || "none"}`;
}

// --- wiring ------------------------------------------------------------------------------------------------

$("predict").addEventListener("click", () => { ctx.ids = null; refresh(); });
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && e.ctrlKey) { ctx.ids = null; refresh(); } });
$("search").addEventListener("keydown", (e) => { if (e.key === "Enter") guarded(find)(); });
$("undo").addEventListener("click", () => { if (undos.length) goTo(undos.pop()); $("undo").disabled = undos.length === 0; });
$("sample").addEventListener("click", guarded(sample));
$("draw-append").addEventListener("click", () => drawn && step(drawn.s.id, drawn.s.text, drawn.s.model_prob, drawn.alts));
$("run").addEventListener("click", guarded(run));
$("ask").addEventListener("click", guarded(ask));
$("colour").addEventListener("click", guarded(colour));
$("find").addEventListener("click", guarded(find));
$("find-append").addEventListener("click", () => foundToken &&
  step(foundToken.ids[0], foundToken.pieces[0], foundToken.prob, alternativesOf(last, foundToken.ids[0])));
$("compare-run").addEventListener("click", guarded(compare));
$("model").addEventListener("change", refresh);
$("chat").addEventListener("change", refresh);
for (const id of [...STAGES, "k"]) {
  $(id).addEventListener("input", () => {
    const out = document.querySelector(`output[for=${id}]`);
    if (out) out.textContent = $(id).value;
    refresh();
  });
}

(async function start() {
  for (;;) {
    try {
      await models();
      $("status").textContent = "";
      return refresh();
    } catch (e) {
      $("status").textContent = down ? $("status").textContent : `waiting for the server: ${e.message}`;
      await new Promise((ok) => setTimeout(ok, 1000));
    }
  }
})();
