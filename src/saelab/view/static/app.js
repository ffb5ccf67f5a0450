// saelab atlas viewer. One page, hash routes:
//   #/  (?sort=&order=&q=&min=&max=&page=)  feature list
//   #/f/ID                                   feature page
//   #/search/QUERY                           search results
//   #/live                                   live text box (server only)
//   #/about                                  model, hook, SAE config, metrics, density histogram
// Served by `saelab serve` (data from /api/...) or exported by `saelab atlas export-html`
// (data from data/*.js script files, set up by data/meta.js as window.SAELAB_STATIC).
// Text from the atlas is only ever put in the page as text nodes, never as HTML.
"use strict";

const STATIC = window.SAELAB_STATIC || null;
const PAGE_SIZE = 50;
const main = () => document.getElementById("main");

// ---------------------------------------------------------------- DOM helpers
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = visible(v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, k === "title" ? visible(v) : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(visible(c)));
  }
  return node;
}
// Bidirectional controls (U+202E RIGHT-TO-LEFT OVERRIDE, ...) in atlas text would reorder what
// is drawn after them: every text node shows them as visible marks instead of applying them.
const BIDI = /[\u061C\u200E\u200F\u202A-\u202E\u2066-\u2069]/g;
function visible(v) {
  return String(v).replace(BIDI, (c) => `\u27E6U+${c.charCodeAt(0).toString(16).toUpperCase().padStart(4, "0")}\u27E7`);
}
function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(visible(c)));
  return node;
}
function show(...nodes) { main().replaceChildren(...nodes.flat(2).filter((n) => n !== null && n !== undefined && n !== false)); }
const fmt = (x, d = 3) => (x === null || x === undefined) ? "–" : Number(x).toPrecision(d);
const pct = (x) => x === 0 ? "0" : x < 1e-4 ? x.toExponential(1) : (100 * x).toPrecision(3) + "%";
const showToken = (t) => t.replace(/\n/g, "⏎").replace(/\t/g, "⇥");
const featLink = (id, label) => el("a", { href: `#/f/${id}` }, `#${id}`, label ? el("span", { class: "muted" }, " " + label) : null);

// ---------------------------------------------------------------- data access
async function getJSON(url, opts) {
  const r = await fetch(url, opts);
  if (!r.ok) {
    let msg = r.statusText;
    try { msg = (await r.json()).detail || msg; } catch (e) { /* not JSON */ }
    throw new Error(`${r.status}: ${msg}`);
  }
  return r.json();
}
const pending = {};
function loadScript(src, key) {
  return new Promise((resolve, reject) => {
    pending[key] = resolve;
    const s = el("script", { src });
    s.onerror = () => reject(new Error(`could not load ${src}`));
    document.head.append(s);
  });
}
window.SAELAB_PAGE = (id, page) => { const r = pending["f" + id]; if (r) r(page); };
window.SAELAB_LIST = (keys, rows) => {
  const list = rows.map((r) => Object.fromEntries(keys.map((k, i) => [k, r[i]])));
  pending.list && pending.list(list);
};
window.SAELAB_TOKENS = (tokens) => { pending.tokens && pending.tokens(tokens); };
let staticList = null, staticTokens = null;
async function allFeatures() { return staticList || (staticList = await loadScript("data/list.js", "list")); }

const api = {
  meta: () => STATIC ? Promise.resolve(STATIC) : getJSON("api/meta"),
  schema: () => STATIC ? Promise.resolve(STATIC.schema) : getJSON("api/schema"),
  feature: (id) => STATIC ? loadScript(`data/f/${id}.js`, "f" + id) : getJSON(`api/feature/${id}`),
  async list(p) {
    if (!STATIC) {
      const q = new URLSearchParams({ sort: p.sort, order: p.order, offset: p.page * PAGE_SIZE, limit: PAGE_SIZE });
      if (p.q) q.set("q", p.q);
      if (p.min) q.set("min_density", p.min);
      if (p.max) q.set("max_density", p.max);
      return getJSON("api/features?" + q);
    }
    let rows = (await allFeatures()).filter((f) =>
      (!p.q || (f.label + " " + (f.explanation || "")).toLowerCase().includes(p.q.toLowerCase())) &&
      (!p.min || f.density >= +p.min) && (!p.max || f.density <= +p.max));
    const dir = p.order === "asc" ? 1 : -1, key = p.sort === "confidence" ? "label_confidence" : p.sort === "score" ? "explanation_score" : p.sort;
    rows = rows.slice().sort((a, b) => (a[key] < b[key] ? -dir : a[key] > b[key] ? dir : a.id - b.id));
    return { total: rows.length, items: rows.slice(p.page * PAGE_SIZE, (p.page + 1) * PAGE_SIZE) };
  },
  async search(q) {
    if (!STATIC) return getJSON("api/search?q=" + encodeURIComponent(q));
    const all = await allFeatures();
    staticTokens = staticTokens || await loadScript("data/tokens.js", "tokens");
    const n = q.replace(/^#/, "");
    const byId = /^\d+$/.test(n) && +n < all.length ? { id: +n, label: all[+n].label } : null;
    const ql = q.toLowerCase();
    const byLabel = all.filter((f) => (f.label + " " + (f.explanation || "")).toLowerCase().includes(ql))
      .sort((a, b) => b.density - a.density).slice(0, 50);
    const byToken = (staticTokens[ql.trim()] || []).map(([id, a]) => ({ id, activation: a, token: q, label: all[id].label }));
    return { q, by_id: byId, by_label: byLabel, by_token: byToken };
  },
  live: (text) => post("api/live", { text }),
  steer: (body) => post("api/steer", body),
  attribute: (text, target) => post("api/attribute", { text, target: target || null }),
  relatives: (id) => (STATIC || !META.relatives) ? Promise.resolve({ items: [] }) : getJSON(`api/relatives/${id}`),
};
function post(url, body) {
  return getJSON(url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
}

// ---------------------------------------------------------------- shared pieces
function tokenSpans(tokens, acts, max, peak) {
  return tokens.map((t, i) => {
    const a = acts[i];
    const s = el("span", { class: "tok" + (i === peak ? " peak" : ""), title: `${showToken(t)} · ${a ? a : 0}` }, showToken(t));
    if (a > 0) s.style.backgroundColor = `rgba(251, 146, 60, ${Math.min(1, 0.12 + 0.88 * a / max).toFixed(3)})`;
    return s;
  });
}
function exampleRow(ex, vocab, max) {
  const tokens = ex.t.map((i) => vocab[i] ?? `<${i}>`);
  return el("div", { class: "example" }, el("span", { class: "act" }, fmt(ex.act)), tokenSpans(tokens, ex.a, max, ex.peak));
}
function barChart(counts, labelAt, width = 600, height = 120) {
  const max = Math.max(1, ...counts), bw = width / counts.length;
  const g = svg("svg", { class: "hist", viewBox: `0 0 ${width} ${height + 16}`, width, height: height + 16, role: "img" });
  counts.forEach((c, i) => {
    const h = c ? Math.max(1, (height * c) / max) : 0;
    const r = svg("rect", { x: (i * bw + 0.5).toFixed(1), y: (height - h).toFixed(1), width: Math.max(1, bw - 1).toFixed(1), height: h.toFixed(1) });
    r.append(svg("title", {}, `${labelAt(i)} – ${labelAt(i + 1)}: ${c}`));
    g.append(r);
  });
  for (const i of [0, Math.floor(counts.length / 2), counts.length]) {
    g.append(svg("text", { x: Math.min(width - 30, i * bw), y: height + 12 }, labelAt(i)));
  }
  return g;
}

// ---------------------------------------------------------------- pages
let META = null;
let listSel = 0, listIds = [];

function listParams() {
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  return { sort: q.get("sort") || "density", order: q.get("order") || "desc", q: q.get("q") || "",
           min: q.get("min") || "", max: q.get("max") || "", page: Math.max(0, parseInt(q.get("page") || "0", 10) || 0) };
}
function setList(p) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(p)) if (v !== "" && v !== null) q.set(k, v);
  location.hash = "#/?" + q;
}

async function pageList() {
  const p = listParams();
  const data = await api.list(p);
  const pages = Math.max(1, Math.ceil(data.total / PAGE_SIZE));
  const cols = [["id", "Feature", false], ["label", "Label", false], ["confidence", "Confidence", true],
                ["density", "Density", true], ["max_act", "Max act.", true]];
  const head = el("tr", {}, cols.map(([key, name, num]) => el("th", {
    class: `sortable ${num ? "num" : ""} ${p.sort === key ? "sorted" : ""} ${p.order === "asc" ? "asc" : ""}`, tabindex: 0,
    onclick: () => setList({ ...p, sort: key, order: p.sort === key && p.order === "desc" ? "asc" : "desc", page: 0 }),
  }, name)));
  listIds = data.items.map((f) => f.id);
  listSel = Math.min(listSel, Math.max(0, listIds.length - 1));
  const body = el("tbody", {}, data.items.map((f, i) => el("tr", { class: i === listSel ? "selected" : "", "data-id": f.id },
    el("td", {}, el("a", { href: `#/f/${f.id}` }, `#${f.id}`)),
    el("td", {}, f.label, f.explanation ? el("div", { class: "muted" }, f.explanation) : null),
    el("td", { class: "num" }, fmt(f.label_confidence, 2)),
    el("td", { class: "num" }, pct(f.density)),
    el("td", { class: "num" }, fmt(f.max_act)))));
  const filter = (name, placeholder, value, size) => el("input", { name, placeholder, value, size, "aria-label": placeholder });
  const form = el("form", { class: "filters", onsubmit: (e) => {
    e.preventDefault();
    const f = new FormData(e.target);
    setList({ ...p, q: f.get("q"), min: f.get("min"), max: f.get("max"), page: 0 });
  } }, filter("q", "label or explanation contains…", p.q, 28), filter("min", "min density", p.min, 10),
     filter("max", "max density", p.max, 10), el("button", { type: "submit" }, "Filter"),
     el("span", { class: "muted" }, `${data.total.toLocaleString()} features`));
  const pager = el("div", { class: "pager" },
    el("button", { disabled: p.page === 0, onclick: () => setList({ ...p, page: p.page - 1 }) }, "← Previous"),
    el("span", {}, `page ${p.page + 1} of ${pages}`),
    el("button", { disabled: p.page + 1 >= pages, onclick: () => setList({ ...p, page: p.page + 1 }) }, "Next →"));
  show(el("h1", {}, "Features"), form, el("table", { id: "feature-table" }, el("thead", {}, head), body), pager);
}

// The feature's closest features in the other dictionaries of a study (decoder cosine),
// linked where that dictionary's atlas is served beside this one.
function relativesList(items) {
  if (!items.length) return null;
  const groups = {};
  for (const r of items) (groups[r.dictionary] = groups[r.dictionary] || []).push(r);
  const item = (r) => el("li", {},
    r.url ? el("a", { href: `${r.url}#/f/${r.feature}` }, `#${r.feature}`) : `#${r.feature}`,
    r.label ? el("span", { class: "muted" }, " " + r.label) : null,
    el("span", { class: "muted" }, ` cos ${fmt(r.cosine, 2)}`));
  const group = ([name, rs]) => el("div", { class: "rel-group" },
    el("div", { class: "muted" }, name), el("ul", { class: "links" }, rs.map(item)));
  return [el("h2", {}, "In other dictionaries (decoder cosine)"),
    el("div", { id: "relatives" }, Object.entries(groups).map(group))];
}

// The page contract (saelab.analyse.page, served as a JSON schema): the fields a page must
// have, at the top and in each example, so an atlas this viewer cannot draw says what it lacks.
let SCHEMA = null;
function missingFields(f) {
  const page = SCHEMA.page, example = page.$defs.Example;
  const lacks = (obj, def, where) => (def.required || []).filter((k) => !(k in obj)).map((k) => where + k);
  const examples = [...(f.top || []), ...(f.bands || []).flatMap((b) => b.examples || [])];
  return [...lacks(f, page, ""), ...examples.slice(0, 1).flatMap((e) => lacks(e, example, "example."))];
}

async function pageFeature(id) {
  const [f, rel] = await Promise.all([api.feature(id), api.relatives(id)]);
  SCHEMA = SCHEMA || await api.schema();
  const missing = missingFields(f);
  if (missing.length) throw new Error(`feature ${id}'s page lacks ${missing.join(", ")}: rebuild the atlas with this saelab (saelab atlas)`);
  const vocab = f.vocab;
  const max = f.max_act || 1;
  const [lo, hi, nb] = META.hist_log10;
  const first = f.hist.findIndex((c) => c > 0), last = f.hist.length - 1 - [...f.hist].reverse().findIndex((c) => c > 0);
  const edge = (i) => fmt(10 ** (lo + ((first + i) * (hi - lo)) / nb), 2);
  const labels = f.labels || {};
  const relList = (items, what) => items.length ? el("ul", { class: "links" }, items.map(([i, v]) =>
    el("li", {}, featLink(i, labels[i]), el("span", { class: "muted" }, ` ${what} ${fmt(v, 2)}`)))) : el("p", { class: "muted" }, "none");
  const logitTable = (rows, cls) => el("table", { class: "logits" }, el("tbody", {}, rows.map(([i, v]) =>
    el("tr", {}, el("td", {}, el("span", { class: "tokentext" }, showToken(vocab[i] ?? `<${i}>`))), el("td", { class: `v ${cls}` }, fmt(v))))));
  const nav = el("p", { class: "muted" }, id > 0 ? el("a", { href: `#/f/${id - 1}` }, "← previous") : null, "  ",
    id + 1 < META.n_features ? el("a", { href: `#/f/${id + 1}` }, "next →") : null);
  show(
    nav,
    el("h1", {}, `Feature #${id} `, el("span", { id: "feature-label" }, f.label)),
    el("p", { class: "muted" }, `automatic label, confidence ${fmt(f.label_confidence, 2)} (share of top examples peaking on it)`),
    f.explanation ? el("div", { class: "explanation" }, f.explanation,
      el("span", { class: "muted" }, f.explanation_score === null ? "" : ` · detection score ${fmt(f.explanation_score, 2)}`)) : null,
    el("div", { class: "stats" },
      el("div", { class: "stat" }, el("b", {}, pct(f.density)), el("span", {}, "density")),
      el("div", { class: "stat" }, el("b", {}, f.count.toLocaleString()), el("span", {}, "firings")),
      el("div", { class: "stat" }, el("b", {}, fmt(f.max_act)), el("span", {}, "max activation")),
      el("div", { class: "stat" }, el("b", {}, fmt(f.mean_act)), el("span", {}, "mean activation"))),
    el("h2", {}, "Activation histogram"),
    first < 0 ? el("p", { class: "muted" }, "never fired on the atlas tokens") : barChart(f.hist.slice(first, last + 1), edge),
    el("div", { class: "cols" },
      el("section", {},
        el("h2", {}, `Top activations (${f.top.length})`),
        el("div", { id: "top-examples" }, f.top.map((e) => exampleRow(e, vocab, max))),
        el("h2", {}, "Quantile bands"),
        el("div", { id: "bands" }, f.bands.slice().reverse().map((b) => el("div", {},
          el("div", { class: "band-head" }, `quantile ${Math.round(100 * b.q[0])}–${Math.round(100 * b.q[1])}% · activation ${fmt(b.lo)}–${fmt(b.hi)}`),
          b.examples.map((e) => exampleRow(e, vocab, max)))))),
      el("section", {},
        f.logits ? [el("h2", {}, "Logit effects"), el("div", { class: "cols", id: "logits" },
          el("div", {}, el("div", { class: "muted" }, "raises"), logitTable(f.logits.pos, "pos")),
          el("div", {}, el("div", { class: "muted" }, "lowers"), logitTable(f.logits.neg, "neg")))] : null,
        el("h2", {}, "Nearest features (decoder cosine)"), relList(f.neighbours, "cos"),
        el("h2", {}, "Co-firing features (Jaccard)"), relList(f.cofire, "J"),
        relativesList(rel.items))),
    steerBox(id, f),
  );
  document.title = `#${id} ${f.label} · saelab atlas`;
}

// The steering box: a prompt continued twice, as the model is and with this feature changed
// at the SAE's hook (the SAE's error term kept, so nothing else moves).
function steerBox(id, f) {
  if (STATIC || !META.steer) return null;
  const peak = f.max_act || 1;
  const prompt = el("textarea", { id: "steer-prompt", class: "short", maxlength: META.max_chars, "aria-label": "prompt" });
  prompt.value = "The";
  const mode = el("select", { id: "steer-mode", "aria-label": "how to change the feature" },
    el("option", { value: "clamp" }, "clamp to"), el("option", { value: "add" }, "add direction ×"),
    el("option", { value: "scale" }, "scale by"), el("option", { value: "ablate" }, "ablate"));
  const value = el("input", { id: "steer-value", type: "number", step: "any", size: 8, value: (2 * peak).toPrecision(3), "aria-label": "strength" });
  const tokens = el("input", { id: "steer-tokens", type: "number", min: 1, max: META.max_new_tokens, value: 32, size: 4, "aria-label": "new tokens" });
  const out = el("div", { id: "steer-out" });
  const run = async () => {
    out.replaceChildren(el("p", { class: "muted" }, "generating…"));
    try {
      const r = await api.steer({ feature: id, prompt: prompt.value, mode: mode.value, value: +value.value || 0, max_new_tokens: +tokens.value || 32 });
      const what = { clamp: `#${id} clamped to ${r.value}`, add: `#${id} direction × ${r.value} added`, scale: `#${id} scaled by ${r.value}`, ablate: `#${id} ablated` }[r.mode];
      const col = (title, cls, text) => el("div", {}, el("div", { class: "muted" }, title),
        el("div", { class: `continuation ${cls}` }, el("span", { class: "prompt" }, r.prompt), text));
      out.replaceChildren(el("div", { class: "cols" }, col("unsteered", "clean", r.clean), col(`steered: ${what}`, "steered", r.steered)),
        el("p", { class: "muted" }, `${r.seconds} s${r.truncated ? " · prompt truncated" : ""}`));
    } catch (e) {
      out.replaceChildren(el("p", { class: "error" }, e.message));
    }
  };
  prompt.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(); });
  return el("section", { id: "steer" }, el("h2", {}, "Steer the model with this feature"),
    el("p", { class: "muted" }, `Greedy continuations of the prompt, without and with the feature changed at ${META.hook_name}. Its largest activation on the atlas tokens is ${fmt(peak)}.`),
    prompt, el("div", { class: "filters" }, mode, value, el("label", {}, "new tokens ", tokens),
      el("button", { id: "steer-run", onclick: run }, "Steer (Ctrl+Enter)")), out);
}

async function pageSearch(q) {
  document.getElementById("search").value = q;
  const r = await api.search(q);
  const list = (items, extra) => items.length ? el("ul", { class: "links" }, items.map((f) => el("li", {}, featLink(f.id, f.label), extra(f))))
    : el("p", { class: "muted" }, "no matches");
  show(el("h1", {}, "Search: ", el("span", { class: "tokentext" }, q)),
    r.by_id ? [el("h2", {}, "Feature"), el("p", {}, featLink(r.by_id.id, r.by_id.label))] : null,
    el("h2", {}, "Label or explanation contains it"), list(r.by_label, (f) => el("span", { class: "muted" }, ` density ${pct(f.density)}`)),
    el("h2", {}, "Fires on this token in its top examples"), list(r.by_token, (f) => el("span", { class: "muted" }, ` activation ${fmt(f.activation)}`)));
}

function pageLive() {
  if (!META.live) {
    show(el("h1", {}, "Live text"), el("p", { class: "error" }, META.live_error || "the live model is off"));
    return;
  }
  const out = el("div", { class: "live-out", id: "live-out" });
  const box = el("textarea", { id: "live-text", maxlength: META.max_chars, placeholder: "Type any text; Ctrl+Enter runs it." });
  const run = async () => {
    out.replaceChildren(el("p", { class: "muted" }, "running…"));
    try {
      const r = await api.live(box.value);
      const labels = r.labels || {};
      const side = el("div", {});
      const max = Math.max(1e-6, ...r.features.map((fs) => (fs[0] ? fs[0][1] : 0)));
      const pick = (i) => {
        out.querySelectorAll(".tok.sel").forEach((n) => n.classList.remove("sel"));
        spans[i].classList.add("sel");
        side.replaceChildren(el("h2", {}, "Token ", el("span", { class: "tokentext" }, showToken(r.tokens[i]))),
          r.features[i].length ? el("ul", { class: "links" }, r.features[i].map(([id, a]) =>
            el("li", {}, featLink(id, labels[id]), el("span", { class: "muted" }, ` ${fmt(a)}`)))) : el("p", { class: "muted" }, "no feature fires"));
      };
      const spans = r.tokens.map((t, i) => {
        const top = r.features[i][0];
        const s = el("span", { class: "tok", title: top ? `#${top[0]} ${labels[top[0]] || ""} · ${top[1]}` : "no feature", onclick: () => pick(i) }, showToken(t));
        if (top) s.style.backgroundColor = `rgba(251, 146, 60, ${Math.min(1, 0.12 + 0.88 * top[1] / max).toFixed(3)})`;
        return s;
      });
      out.replaceChildren(
        el("p", { class: "muted" }, `${r.tokens.length} tokens${r.truncated ? " (truncated)" : ""} in ${r.seconds} s; click a token for its features`),
        el("div", { class: "live-tokens", id: "live-tokens" }, spans),
        el("div", { class: "cols" }, side, el("div", {}, el("h2", {}, "Strongest features on this text"),
          el("ul", { class: "links", id: "live-top" }, r.top.map(([id, a]) => el("li", {}, featLink(id, labels[id]), el("span", { class: "muted" }, ` ${fmt(a)}`)))))));
    } catch (e) {
      out.replaceChildren(el("p", { class: "error" }, e.message));
    }
  };
  box.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(); });
  const target = el("input", { id: "attr-target", size: 12, maxlength: 64, placeholder: "predicted", "aria-label": "target token" });
  const attrOut = el("div", { class: "live-out", id: "attr-out" });
  const attribute = async () => {
    attrOut.replaceChildren(el("p", { class: "muted" }, "attributing…"));
    try {
      const r = await api.attribute(box.value, target.value);
      const labels = r.labels || {};
      const chip = ([id, v]) => el("li", {}, featLink(id, labels[id]), el("span", { class: v > 0 ? "pos" : "neg" }, ` ${v > 0 ? "+" : ""}${fmt(v)}`));
      attrOut.replaceChildren(
        el("p", {}, "Next token ", el("span", { class: "tokentext", id: "attr-target-token" }, showToken(r.target)),
          el("span", { class: "muted" }, ` · logit ${fmt(r.logit)} · activation × gradient of that logit, per token (${r.seconds} s)`)),
        el("div", { class: "cols" },
          el("ol", { id: "attr-tokens", class: "attr" }, r.tokens.map((t, i) => el("li", {},
            el("span", { class: "tokentext" }, showToken(t)),
            r.features[i].length ? el("ul", { class: "chips" }, r.features[i].slice(0, 4).map(chip)) : el("span", { class: "muted" }, " –")))),
          el("div", {}, el("h2", {}, "Most attributed over the prompt"), el("ul", { class: "links", id: "attr-top" }, r.top.map(chip)))));
    } catch (e) {
      attrOut.replaceChildren(el("p", { class: "error" }, e.message));
    }
  };
  show(el("h1", {}, "Live text"),
    el("p", { class: "muted" }, `The model and SAE run on your text (at most ${META.max_chars} characters, ${META.max_tokens} tokens).`),
    box, el("p", {}, el("button", { id: "live-run", onclick: run }, "Run (Ctrl+Enter)")), out,
    META.steer ? [el("h2", {}, "Which features drive the next token?"),
      el("p", { class: "filters" }, el("label", {}, "target token ", target),
        el("button", { id: "attr-run", onclick: attribute }, "Attribute")), attrOut] : null);
  box.focus();
}

function pageAbout() {
  const m = META, cfg = m.sae.cfg, met = m.metrics || {};
  const row = (k, v) => (v === undefined || v === null) ? null : el("tr", {}, el("td", {}, k), el("td", {}, String(v)));
  const dh = m.density_hist, step = (dh.hi - dh.lo) / dh.counts.length;
  show(el("h1", {}, "About this atlas"),
    el("table", { class: "kv" }, el("tbody", {},
      row("model", m.model), row("hook", m.hook_name), row("corpus (held-out documents)", m.corpus),
      row("tokens read", m.tokens.toLocaleString()), row("context length", m.context_length),
      row("SAE", m.sae.path), row("architecture", cfg.architecture), row("d_in", cfg.d_in),
      row("latents", cfg.n_latents.toLocaleString()), row("k", cfg.k), row("built", m.created), row("saelab", m.saelab_version))),
    el("h2", {}, "Metrics"),
    el("table", { class: "kv", id: "metrics" }, el("tbody", {},
      row("FVU", met.fvu !== undefined ? fmt(met.fvu, 4) : undefined),
      row("L0 (atlas tokens)", fmt(met.atlas_l0, 4)),
      row("dead latents (atlas tokens)", pct(met.atlas_dead_fraction)),
      row("CE loss recovered", met.ce_recovered !== undefined ? fmt(met.ce_recovered, 4) : undefined),
      row("CE clean → spliced", met.ce_clean !== undefined ? `${fmt(met.ce_clean, 4)} → ${fmt(met.ce_spliced, 4)}` : undefined),
      row("KL(clean ‖ spliced)", met.kl !== undefined ? fmt(met.kl, 3) : undefined),
      row("embedding cosine, spliced", met.cos_spliced !== undefined ? fmt(met.cos_spliced, 4) : undefined),
      row("splice-eval tokens", met.tokens))),
    el("h2", {}, "Feature density (log10)"),
    el("p", { class: "muted" }, `${dh.dead.toLocaleString()} features never fired on the atlas tokens.`),
    barChart(dh.counts, (i) => (dh.lo + i * step).toFixed(1)));
}

// ---------------------------------------------------------------- routing and keys
async function route() {
  try {
    let h;
    try { h = decodeURIComponent(location.hash.replace(/^#/, "")) || "/"; } catch (e) {
      throw new Error(`this address is not a valid link (${e.message}): ${location.hash.slice(0, 200)}`);
    }
    META = META || await api.meta();
    document.getElementById("subtitle").textContent = visible(`${META.model} · ${META.hook_name} · ${META.n_features.toLocaleString()} features`);
    const dicts = Object.entries(META.dictionaries || {});
    if (dicts.length > 1) document.getElementById("dicts").replaceChildren("dictionaries: ", ...dicts.map(([name, url]) =>
      name === META.current ? el("b", {}, name, " ") : el("a", { href: url + "#/" }, name + " ")));
    let m;
    if ((m = h.match(/^\/f\/(\d+)$/))) await pageFeature(+m[1]);
    else if ((m = h.match(/^\/search\/(.+)$/))) await pageSearch(m[1]);
    else if (h === "/live") pageLive();
    else if (h === "/about") pageAbout();
    else await pageList();
    window.scrollTo(0, 0);
  } catch (e) {
    show(el("h1", {}, "Not available"), el("p", { class: "error" }, e.message));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = document.getElementById("search").value.trim();
    if (q) location.hash = "#/search/" + encodeURIComponent(q);
  });
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    if (t instanceof HTMLInputElement || t instanceof HTMLTextAreaElement || e.ctrlKey || e.metaKey || e.altKey) return;
    const h = location.hash.replace(/^#/, "") || "/";
    const f = h.match(/^\/f\/(\d+)$/);
    if (e.key === "/") { e.preventDefault(); document.getElementById("search").focus(); }
    else if (e.key === "g") location.hash = "#/";
    else if (e.key === "l") location.hash = "#/live";
    else if (e.key === "a") location.hash = "#/about";
    else if (f && (e.key === "j" || e.key === "ArrowRight") && +f[1] + 1 < META.n_features) location.hash = `#/f/${+f[1] + 1}`;
    else if (f && (e.key === "k" || e.key === "ArrowLeft") && +f[1] > 0) location.hash = `#/f/${+f[1] - 1}`;
    else if (h.startsWith("/") && !f && document.getElementById("feature-table")) {
      const rows = document.querySelectorAll("#feature-table tbody tr");
      if (e.key === "j" || e.key === "k") {
        listSel = Math.max(0, Math.min(rows.length - 1, listSel + (e.key === "j" ? 1 : -1)));
        rows.forEach((r, i) => r.classList.toggle("selected", i === listSel));
        rows[listSel] && rows[listSel].scrollIntoView({ block: "nearest" });
      } else if (e.key === "Enter" && listIds[listSel] !== undefined) location.hash = `#/f/${listIds[listSel]}`;
    }
  });
  window.addEventListener("hashchange", route);
  route();
});
