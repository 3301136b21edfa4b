"""The web page at `/`: every dataset's coverage and consistency, read through the JSON API.

The HTML is a static shell with no data in it, so it is served without a token; its script
fetches the data with the token taken from the URL fragment (`/#token=...`, never sent to the
server nor left in the address bar) or typed into the field. No external assets: the style and
script are inline and pinned by hash in the Content-Security-Policy, and values are inserted as
text (never as HTML), so a dataset name cannot inject markup.
"""

from __future__ import annotations

import base64
import hashlib
import json

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from lopd.http_contract import DATASETS_PATH, JSON_MEDIA_TYPE

router = APIRouter(tags=["page"])
PAGE_PATH = "/"

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem auto; max-width: 70rem; padding: 0 1rem; color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.15rem; margin: 0 0 .5rem; }
form { margin-bottom: 1rem; } input { width: 22rem; }
.dataset { border: 1px solid #ccc; border-radius: 6px; padding: 1rem; margin: 1rem 0; }
.verdict { font-weight: bold; padding: 0 .4rem; border-radius: 4px; }
.verdict.consistent { background: #d7f5dd; } .verdict.inconsistent { background: #fbd5d5; }
table { border-collapse: collapse; margin: .5rem 0; } td { padding: .1rem .8rem .1rem 0; vertical-align: top; }
td:first-child { color: #555; } code { font-size: 12px; word-break: break-all; }
.hist { display: flex; align-items: flex-end; gap: 2px; height: 120px; border-bottom: 1px solid #888;
        margin-top: .5rem; max-width: 40rem; }
.bar { flex: 1; background: #4a78c2; min-height: 1px; }
.axis { display: flex; justify-content: space-between; max-width: 40rem; color: #555; font-size: 12px; }
.problems { color: #a00; } .error { color: #a00; }
"""

_SCRIPT_BODY = """
const $ = (id) => document.getElementById(id);
const fmt = (x) => (x === null || x === undefined) ? "-" : (typeof x === "number" ? x.toLocaleString("en") : String(x));

function node(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function fragmentToken() {
  const m = /(?:^|&)token=([^&]*)/.exec(location.hash.slice(1));
  if (!m) return "";
  history.replaceState(null, "", location.pathname + location.search);  // keep it out of the address bar
  return decodeURIComponent(m[1]);
}

async function api(path) {
  const headers = { Accept: JSON_MEDIA_TYPE };
  const token = $("token").value.trim();
  if (token) headers.Authorization = "Bearer " + token;
  const r = await fetch(path, { headers, cache: "no-store" });
  const body = await r.json().catch(() => null);
  if (!r.ok) {
    const msg = body && body.error ? body.error.message : (body && body.problems ? body.problems.join("; ") : "");
    throw new Error(r.status + (msg ? ": " + msg : ""));
  }
  return body;
}

function rows(pairs) {
  const t = node("table");
  for (const [k, v, code] of pairs) {
    const tr = node("tr");
    tr.append(node("td", "", k));
    const td = node("td");
    td.append(code ? node("code", "", fmt(v)) : document.createTextNode(fmt(v)));
    tr.append(td);
    t.append(tr);
  }
  return t;
}

function withEmptyBins(bins) {  // the stats list only bins that have tokens; draw the gaps as empty bars
  const out = [];
  for (const b of bins) {
    const prev = out[out.length - 1];
    for (let lo = prev ? prev.hi : b.lo; lo < b.lo; lo += b.hi - b.lo) out.push({ lo, hi: lo + b.hi - b.lo, count: 0 });
    out.push(b);
  }
  return out;
}

function histogram(rawBins) {
  const bins = withEmptyBins(rawBins);
  const wrap = node("div");
  wrap.append(node("div", "", "teacher log-prob histogram (tokens per unit bin)"));
  const h = node("div", "hist");
  h.setAttribute("role", "img");
  h.setAttribute("aria-label", "histogram of teacher log-probs");
  const max = Math.max(1, ...bins.map((b) => b.count));
  for (const b of bins) {
    const bar = node("div", "bar");
    bar.style.height = (100 * b.count / max) + "%";
    bar.title = "[" + b.lo + ", " + b.hi + "): " + b.count;
    bar.dataset.count = String(b.count);
    h.append(bar);
  }
  wrap.append(h);
  if (bins.length) {
    const axis = node("div", "axis");
    axis.append(node("span", "", String(bins[0].lo)), node("span", "", String(bins[bins.length - 1].hi)));
    wrap.append(axis);
  }
  return wrap;
}

function render(d, cov, con) {
  const s = node("section", "dataset");
  s.id = "dataset-" + d.name;
  const title = node("h2", "", d.name + " v" + d.version + " ");
  title.append(node("span", "verdict " + con.verdict, con.verdict));
  s.append(title);
  s.append(rows([
    ["versions", d.versions.join(", ")],
    ["samples scored", cov.scored], ["skipped", cov.skipped], ["input records", cov.input_records],
    ["response tokens", cov.num_response_tokens], ["prompt tokens", cov.num_prompt_tokens],
    ["shards", cov.shards], ["bytes", cov.bytes],
    ["teacher", con.teacher_fingerprint, true], ["SFT-data teacher", con.sft_teacher_fingerprint, true],
    ["tokenizer", con.tokenizer_fingerprint, true], ["content hash", d.content_hash, true],
    ["teacher log-prob mean", con.teacher_logprobs.mean === null ? null : con.teacher_logprobs.mean.toFixed(4)],
  ]));
  for (const run of cov.in_progress) {
    s.append(node("p", "", "in progress: run " + run.run_key.slice(0, 16) + ", " + run.parts_done + "/" +
      run.parts_total + " parts, " + run.samples_done + "/" + run.samples_total + " samples"));
  }
  s.append(histogram(con.teacher_logprob_histogram));
  return s;
}

async function load() {
  const main = $("datasets"), status = $("status"), problems = $("problems");
  main.replaceChildren();
  problems.replaceChildren();
  status.textContent = "loading…";
  try {
    const ready = await fetch("/readyz", { cache: "no-store" }).then((r) => r.json());
    for (const p of ready.problems || []) problems.append(node("li", "", p));
    const list = await api(DATASETS_PATH);
    for (const d of list.datasets) {
      const base = DATASETS_PATH + "/" + encodeURIComponent(d.name);
      try {
        const [cov, con] = await Promise.all([api(base + "/coverage"), api(base + "/consistency")]);
        main.append(render(d, cov, con));
      } catch (e) {
        main.append(node("p", "error", d.name + ": " + e.message));
      }
    }
    status.textContent = list.datasets.length + " dataset(s)";
  } catch (e) {
    status.textContent = "could not load: " + e.message;
    status.className = "error";
  }
}

$("token").value = fragmentToken();
$("auth").addEventListener("submit", (ev) => { ev.preventDefault(); load(); });
load();
"""
# The contract's values the script uses, as JavaScript literals ("use strict" must come first).
_SCRIPT = f"""
"use strict";
const DATASETS_PATH = {json.dumps(DATASETS_PATH)};
const JSON_MEDIA_TYPE = {json.dumps(JSON_MEDIA_TYPE)};
{_SCRIPT_BODY}"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>lightning-opd datasets</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>lightning-opd datasets</h1>
<form id="auth"><label>Token <input id="token" type="password" autocomplete="off"
 placeholder="only needed when the server has a tokens file"></label> <button type="submit">Load</button></form>
<p id="status" role="status"></p>
<ul id="problems" class="problems"></ul>
<main id="datasets"></main>
<script>{_SCRIPT}</script>
</body>
</html>
"""

_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; script-src {_csp_hash(_SCRIPT)}; style-src {_csp_hash(_STYLE)}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@router.get(PAGE_PATH, response_class=HTMLResponse, responses={200: {"description": "The HTML page."}})
async def page() -> HTMLResponse:
    """A read-only page of every dataset (static: its script reads the JSON routes)."""
    return HTMLResponse(PAGE, headers=_HEADERS)
