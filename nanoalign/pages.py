"""HTML pages a person reads: an evaluation's report, a synthetic run's pairs, and a comparison of evaluations.

    python -m nanoalign.pages runs/eval_dpo_vs_sft runs/eval_r2_vs_dpo --out runs/compare.html

eval_winrate.py writes <out>/report.html (write_eval_report) and gen_synthetic.py <out>/report.html
(write_pairs_report); this command writes a page with one row per eval dir, each linking to its report (written
first where missing). Every page is one self-contained file that opens from disk: inline CSS, one inline script,
SVG charts drawn here; it fetches nothing (Content-Security-Policy default-src 'none', the script allowed by its
hash, so no injected handler could run either). Text from a model or a data file reaches the page only as JSON
data (escaped for the HTML parser) and is put on screen with textContent, never parsed as markup.

The report lists every prompt, 100 at a time ("show more"), and reads its filters from the URL, so a view can be
shared or driven by a test:  report.html#verdict=loss&q=refund&sort=margin&dir=asc
    verdict  all | win | loss | tie | skipped   (A's verdict; pairs page: longer = all | chosen | rejected | same)
    q        text search (case-insensitive) over the prompt, both answers and the prompt id
    sort     order | margin | dlen | len_a | len_b   (pairs page: order | gap | dlen | len_chosen | len_rejected)
    dir      desc | asc
"""
import argparse
import base64
import hashlib
import html
import itertools
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from urllib.parse import quote

from nanoalign.errors import InputError
from nanoalign.jsonl import read_json, read_jsonl
from nanoalign.preferences import wilson_interval
from nanoalign.rundir import write_text

PAGE_ROWS = 100  # rows rendered at first and per "show more": the DOM stays small with 5,000 prompts
COLORS = {"a": "#1b7f3b", "b": "#b3261e", "tie": "#8a8a8a", "skipped": "#b07000"}

CSS = """
:root{--fg:#1d1d1f;--muted:#666;--line:#dcdcdc;--card:#f6f6f7;--win:#1b7f3b;--loss:#b3261e;--tie:#8a8a8a;--skip:#b07000}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);margin:0 auto;max-width:1440px;
 padding:12px 24px 40px}
h1{font-size:21px;margin:6px 0 2px}h2{font-size:16px;margin:22px 0 6px}
.muted,.sub{color:var(--muted)}.sub{font-size:12px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px 14px;min-width:150px}
.card .big{font-size:24px;font-weight:650;line-height:1.2}
table{border-collapse:collapse}td,th{padding:3px 12px 3px 0;text-align:left;vertical-align:top}
table.grid td,table.grid th{border-bottom:1px solid var(--line);padding:5px 14px 5px 0}table.grid td:first-child{white-space:nowrap}
th{font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}td.num{white-space:nowrap}
.charts{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.charts figure{margin:0}.charts figcaption{font-size:12px;color:var(--muted);max-width:520px}
svg text{font:11px system-ui,sans-serif;fill:#444}
.controls{position:sticky;top:0;z-index:1;background:#fff;display:flex;flex-wrap:wrap;gap:8px;align-items:center;
 padding:8px 0;border-bottom:1px solid var(--line)}
button,select,input{font:inherit;font-size:13px}
.controls button{border:1px solid var(--line);background:#fff;border-radius:14px;padding:2px 12px;cursor:pointer}
.controls button.on{background:var(--fg);color:#fff;border-color:var(--fg)}
.controls input{width:260px;padding:3px 8px}
article.row{border:1px solid var(--line);border-radius:8px;margin:12px 0;padding:8px 12px}
.row header{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:13px;color:var(--muted)}
.badge{color:#fff;font-weight:600;border-radius:4px;padding:0 7px}
.badge.a{background:var(--win)}.badge.b{background:var(--loss)}.badge.tie{background:var(--tie)}
.badge.skipped{background:var(--skip)}
.prompt,.text{white-space:pre-wrap;overflow-wrap:anywhere}
.prompt{margin:6px 0;font-weight:550}.role{font-size:11px;text-transform:uppercase;color:var(--muted)}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:14px}
.side{border-left:4px solid var(--line);padding-left:10px;min-width:0}.side.won{border-color:var(--win)}
.side.lost{border-color:var(--loss)}.side h4{margin:2px 0 4px;font-size:13px}
.clamp{max-height:15em;overflow:hidden;-webkit-mask-image:linear-gradient(#000 75%,transparent);
 mask-image:linear-gradient(#000 75%,transparent)}
.empty{font-style:italic;color:var(--muted)}
button.more{border:0;background:none;color:#0b57d0;cursor:pointer;padding:0}
details.others{margin-top:6px}details.others .text{margin:2px 0 8px;border-left:3px solid var(--line);padding-left:8px}
#more{margin:10px 0;padding:4px 16px}
@media (max-width:820px){.pair{grid-template-columns:1fr}}
"""

# The list machinery both reports share. The page script defines VIEW = {defaults, keep(row, state), sorts, card}.
LIST_JS = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;  // text, never markup
  return e;
}
const fmt = (x, d) => (x == null ? "n/a" : x.toFixed(d));
const ending = (f) => (f == null ? "ending unknown" : f ? "finished" : "cut at max tokens");
const about = (score, len, fin) => `score ${fmt(score, 3)} \u00b7 ${len ?? "n/a"} ${D.unit} \u00b7 ${ending(fin)}`;
const signed = (x, d) => (x == null ? "n/a" : (x > 0 ? "+" : "") + x.toFixed(d));
const diff = (x, y) => (x == null || y == null ? null : x - y);
function state() {
  const p = new URLSearchParams(location.hash.slice(1)), s = {};
  for (const k in VIEW.defaults) s[k] = p.get(k) || VIEW.defaults[k];
  return s;
}
function setState(change) {
  const s = Object.assign(state(), change), p = new URLSearchParams();
  for (const k in s) if (s[k] !== VIEW.defaults[k]) p.set(k, s[k]);
  location.hash = p.toString();  // hashchange renders
}
function block(cls, text, limit) {  // long text starts collapsed, with a toggle
  const wrap = el("div"), t = el("div", cls, text);
  wrap.append(t);
  if (text.length > limit || text.split("\n").length > 14) {
    t.classList.add("clamp");
    const b = el("button", "more", "show all");
    b.onclick = () => { b.textContent = t.classList.toggle("clamp") ? "show all" : "collapse"; };
    wrap.append(b);
  }
  return wrap;
}
function answer(text) { return text ? block("text", text, 900) : el("div", "text empty", "(empty answer)"); }
function promptBlock(messages) {
  const box = el("div", "prompt");
  if (messages.length === 1) { box.append(block("", messages[0][1], 500)); return box; }
  for (const [role, content] of messages) box.append(el("div", "role", role), block("", content, 500));
  return box;
}
let haystacks = null, shown = 0, matching = [];
function render(more) {
  const s = state();
  for (const b of document.querySelectorAll("[data-set]")) {
    b.classList.toggle("on", s[b.dataset.set] === b.dataset.value);
  }
  for (const k of ["q", "sort", "dir"]) if (document.activeElement !== $(k)) $(k).value = s[k];
  if (!more) {
    const q = s.q.toLowerCase();
    if (q && !haystacks) haystacks = D.rows.map(VIEW.text);
    matching = D.rows.filter((r, i) => VIEW.keep(r, s) && (!q || haystacks[i].includes(q)));
    const key = VIEW.sorts[s.sort];
    if (key) {
      const sign = s.dir === "asc" ? 1 : -1;  // rows without a value (a skipped prompt's margin) go last
      matching = matching.map((r) => [key(r), r]).sort((x, y) =>
        x[0] == null ? (y[0] == null ? 0 : 1) : y[0] == null ? -1 : sign * (x[0] - y[0])).map((x) => x[1]);
    }
    $("rows").replaceChildren();
    shown = 0;
  }
  const next = matching.slice(shown, shown + D.page);
  $("rows").append(...next.map(VIEW.card));
  shown += next.length;
  $("count").textContent = `showing ${shown} of ${matching.length} matching (${D.rows.length} in all)`;
  $("more").hidden = shown >= matching.length;
}
function start() {
  for (const b of document.querySelectorAll("[data-set]")) {
    b.onclick = () => setState({[b.dataset.set]: b.dataset.value});
  }
  let timer;
  $("q").oninput = () => { clearTimeout(timer); timer = setTimeout(() => setState({q: $("q").value}), 200); };
  $("sort").onchange = () => setState({sort: $("sort").value});
  $("dir").onchange = () => setState({dir: $("dir").value});
  $("more").onclick = () => render(true);
  window.addEventListener("hashchange", () => render(false));
  render(false);
  // time to the first frame with the rows laid out, from navigation start (the callback after the frame's paint)
  requestAnimationFrame(() => setTimeout(() => { $("render-ms").textContent = performance.now().toFixed(0); }));
}
"""

EVAL_JS = r"""
const LABEL = {a: D.name_a + " wins", b: D.name_b + " wins", tie: "tie", skipped: "skipped"};
const VERDICT = {win: "a", loss: "b", tie: "tie", skipped: "skipped"};
function side(name, text, score, len, fin, verdict, me) {
  const s = el("section", "side" + (verdict === me ? " won" : verdict === (me === "a" ? "b" : "a") ? " lost" : ""));
  s.append(el("h4", null, `${name} \u00b7 ${about(score, len, fin)}`), answer(text));
  return s;
}
const VIEW = {
  defaults: {verdict: "all", q: "", sort: "order", dir: "desc"},
  keep: (r, s) => s.verdict === "all" || r.w === VERDICT[s.verdict],
  text: (r) => [r.id, ...r.p.map((m) => m[1]), r.a, r.b].join("\n").toLowerCase(),
  sorts: {margin: (r) => diff(r.sa, r.sb), dlen: (r) => r.ta - r.tb, len_a: (r) => r.ta, len_b: (r) => r.tb},
  card(r) {
    const art = el("article", "row");
    art.dataset.id = r.id;
    art.dataset.verdict = r.w;
    const head = el("header");
    head.append(el("span", null, "#" + (r.i + 1)), el("span", null, r.id), el("span", "badge " + r.w, LABEL[r.w]),
                el("span", null, "margin " + signed(diff(r.sa, r.sb), 3)),
                el("span", null, `\u0394 ${signed(r.ta - r.tb, 0)} ${D.unit}`));
    const pair = el("div", "pair");
    pair.append(side(D.name_a, r.a, r.sa, r.ta, r.fa, r.w, "a"), side(D.name_b, r.b, r.sb, r.tb, r.fb, r.w, "b"));
    art.append(head, promptBlock(r.p), pair);
    return art;
  },
};
start();
"""

PAIRS_JS = r"""
function sample(label, text, score, len, fin) {
  const s = el("section", "side" + (label === "chosen" ? " won" : " lost"));
  s.append(el("h4", null, `${label} \u00b7 ${about(score, len, fin)}`), answer(text));
  return s;
}
const LONGER = {chosen: (d) => d > 0, rejected: (d) => d < 0, same: (d) => d === 0};
const VIEW = {
  defaults: {longer: "all", q: "", sort: "order", dir: "desc"},
  keep: (r, s) => s.longer === "all" || (r.tc != null && r.tr != null && LONGER[s.longer](r.tc - r.tr)),
  text: (r) => [r.id, ...r.p.map((m) => m[1]), r.c, r.r, ...r.o.map((o) => o[3])].join("\n").toLowerCase(),
  sorts: {gap: (r) => r.sc - r.sr, dlen: (r) => diff(r.tc, r.tr), len_chosen: (r) => r.tc, len_rejected: (r) => r.tr},
  card(r) {
    const art = el("article", "row");
    art.dataset.id = r.id;
    const head = el("header");
    head.append(el("span", null, "#" + (r.i + 1)), el("span", null, r.id),
                el("span", null, "gap " + fmt(r.sc - r.sr, 3)),
                el("span", null, `\u0394 ${signed(diff(r.tc, r.tr), 0)} ${D.unit} (chosen \u2212 rejected)`));
    const pair = el("div", "pair");
    pair.append(sample("chosen", r.c, r.sc, r.tc, r.fc), sample("rejected", r.r, r.sr, r.tr, r.fr));
    art.append(head, promptBlock(r.p), pair);
    if (r.o.length) {
      const more = el("details", "others");
      const scores = r.o.map((o) => fmt(o[0], 2)).join(", ");
      more.append(el("summary", null, `${r.o.length} other sample${r.o.length > 1 ? "s" : ""} of this prompt (scores ${scores})`));
      for (const [score, len, fin, text] of r.o) {
        more.append(el("h4", null, about(score, len, fin)), answer(text));
      }
      art.append(more);
    }
    return art;
  },
};
start();
"""


# -----------------------------------------------------------------------------
# Building blocks

def script_json(obj) -> str:
    """JSON that is inert inside <script type="application/json">: ASCII only (so U+2028 and every non-ASCII
    character are \\u escapes), and no <, > or & that the HTML parser could read as `</script>` or `<!--`."""
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: str, data=None, script: str = "") -> str:
    """A whole HTML document, ASCII only (non-ASCII in `body` becomes character references), that loads nothing:
    the CSP allows inline styles, data: images and exactly the one script given (by its sha256)."""
    assert script.isascii(), "page scripts are ASCII (write \\u escapes): character references do not apply there"
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src 'sha256-{digest}'; " \
          "base-uri 'none'; form-action 'none'"
    data_tag = f'<script type="application/json" id="data">{script_json(data)}</script>\n' if data is not None else ""
    script_tag = f"<script>{script}</script>\n" if script else ""
    text = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style></head>\n"
            f"<body>\n{body}\n{data_tag}{script_tag}</body></html>\n")
    return text.encode("ascii", "xmlcharrefreplace").decode("ascii")


def num(x, digits=3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def share(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def interval(ci) -> str:
    ok = isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci)
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ok else "n/a"


def finite(x):
    """x if it is a finite number, else None (the page's JSON has no NaN)."""
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def messages(prompt):
    """A prompt (a string or a list of {role, content}) as [[role, text], ...]."""
    if isinstance(prompt, str):
        return [["user", prompt]]
    return [[str(m.get("role", "")), c if isinstance(c := m.get("content"), str) else json.dumps(c)] for m in prompt]


def card(title, big, *subs) -> str:
    return (f'<div class="card"><div class="sub">{esc(title)}</div><div class="big">{esc(big)}</div>'
            + "".join(f'<div class="sub">{esc(s)}</div>' for s in subs) + "</div>")


def kv_table(pairs, cls="") -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in pairs)
    return f'<table class="{cls}">{rows}</table>'


def settings_details(out_dir: Path) -> str:
    """run_settings.json as a collapsed table (absent: nothing)."""
    path = out_dir / "run_settings.json"
    if not path.exists():
        return ""
    settings = read_json(path)
    shown = [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in settings.items()]
    return f"<details><summary>recorded settings ({esc(path.name)})</summary>{kv_table(shown)}</details>"


def controls(buttons, sorts) -> str:
    """The sticky bar: filter buttons [(param, value, label)], search, sort and direction, the row count."""
    out = [f'<button data-set="{esc(p)}" data-value="{esc(v)}">{esc(label)}</button>' for p, v, label in buttons]
    out.append('<input id="q" type="search" placeholder="search prompts and answers">')
    out.append('<select id="sort" title="sort by">' + "".join(f'<option value="{esc(v)}">{esc(label)}</option>'
                                                              for v, label in sorts) + "</select>")
    out.append('<select id="dir" title="direction"><option value="desc">high to low</option>'
               '<option value="asc">low to high</option></select>')
    out.append('<span id="count" class="muted"></span>')
    return f'<div class="controls">{"".join(out)}</div><div id="rows"></div><button id="more" hidden>show more</button>'


def footer(what: str, example: str) -> str:
    return (f'<p class="sub">{esc(what)} Written by nanoalign.pages; first render <span id="render-ms">-</span> ms '
            f"after navigation start. Filters live in the URL, e.g. {esc(example)}</p>")


# -----------------------------------------------------------------------------
# SVG charts (drawn here: crisp, small, nothing to fetch)

def ticks(lo, hi, n=5):
    """About n round numbers spanning [lo, hi]."""
    span = (hi - lo) or 1.0
    step = 10 ** math.floor(math.log10(span / n))
    step *= next(m for m in (1, 2, 5, 10) if span / (step * m) <= n)
    first = math.ceil(lo / step - 1e-9)
    return [k * step for k in range(first, int(math.floor(hi / step + 1e-9)) + 1)]


class Frame:
    """A plot area inside an SVG of w x h pixels with margins for the axis labels; x() and y() map data to pixels."""

    def __init__(self, w, h, xlim, ylim, left=52, right=14, top=14, bottom=40):
        self.w, self.h, self.xlim, self.ylim = w, h, xlim, ylim
        self.left, self.right, self.top, self.bottom = left, w - right, top, h - bottom
        self.parts = []

    def x(self, v):
        lo, hi = self.xlim
        return self.left + (v - lo) / ((hi - lo) or 1) * (self.right - self.left)

    def y(self, v):
        lo, hi = self.ylim
        return self.bottom - (v - lo) / ((hi - lo) or 1) * (self.bottom - self.top)

    def axes(self, xlabel, ylabel, xticks=None, yticks=None):
        p = self.parts
        for t in yticks if yticks is not None else ticks(*self.ylim):
            p.append(f'<line x1="{self.left}" x2="{self.right}" y1="{self.y(t):.1f}" y2="{self.y(t):.1f}" stroke="#eee"/>'
                     f'<text x="{self.left - 5}" y="{self.y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
        for t in xticks if xticks is not None else ticks(*self.xlim):
            p.append(f'<text x="{self.x(t):.1f}" y="{self.bottom + 15}" text-anchor="middle">{t:g}</text>')
        p.append(f'<rect x="{self.left}" y="{self.top}" width="{self.right - self.left}" '
                 f'height="{self.bottom - self.top}" fill="none" stroke="#bbb"/>')
        p.append(f'<text x="{(self.left + self.right) / 2:.0f}" y="{self.h - 6}" text-anchor="middle">{esc(xlabel)}</text>'
                 f'<text transform="translate(13 {(self.top + self.bottom) / 2:.0f}) rotate(-90)" '
                 f'text-anchor="middle">{esc(ylabel)}</text>')

    def svg(self, label):
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.w}" height="{self.h}" role="img" '
                f'aria-label="{esc(label)}">{"".join(self.parts)}</svg>')


def scatter_chart(points, unit):
    """Margin (A - B) against length difference, one dot per scored prompt, coloured by verdict."""
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xmax, ymax = max(1, *map(abs, xs)), max(1e-9, *map(abs, ys))
    f = Frame(520, 320, (-xmax * 1.05, xmax * 1.05), (-ymax * 1.1, ymax * 1.1))
    f.axes(f"\u0394 length (A \u2212 B), {unit}", "reward margin (A \u2212 B)")
    f.parts.append(f'<line x1="{f.x(0):.1f}" x2="{f.x(0):.1f}" y1="{f.top}" y2="{f.bottom}" stroke="#999"/>'
                   f'<line x1="{f.left}" x2="{f.right}" y1="{f.y(0):.1f}" y2="{f.y(0):.1f}" stroke="#999"/>')
    for verdict in ("tie", "b", "a"):  # a dot is a zero-length path segment with a round cap: ~14 bytes a prompt
        d = "".join(f"M{f.x(x):.1f} {f.y(y):.1f}h0" for x, y, v in points if v == verdict)
        if d:
            f.parts.append(f'<path d="{d}" stroke="{COLORS[verdict]}" stroke-width="5" stroke-linecap="round" '
                           'stroke-opacity="0.55" fill="none"/>')
    return f.svg("reward margin against length difference")


def equal_count_bins(pairs, k):
    """Split (value, ...) tuples sorted by value into at most k consecutive bins of about equal size, equal values
    in one bin: a run of equal values goes to the k-quantile its middle falls in (empty bins are left out)."""
    bins, before = [[] for _ in range(k)], 0
    for _, group in itertools.groupby(pairs, key=lambda p: p[0]):
        group = list(group)
        bins[min(k - 1, int(k * (before + len(group) / 2) / len(pairs)))].extend(group)
        before += len(group)
    return [b for b in bins if b]


def win_share_chart(decided, unit, model):
    """A's share of the decided prompts in bins of equal count along the length difference (Wilson 95% whiskers),
    with the length model's fitted probability at each bin's median difference where the summary has one."""
    if not decided:
        return ""
    decided = sorted(decided)  # (dlen, won)
    bins = equal_count_bins(decided, min(8, max(1, len(decided) // 25)))
    f = Frame(520, 320, (-0.5, len(bins) - 0.5), (0, 1), bottom=56)
    f.axes(f"\u0394 length (A \u2212 B), {unit}: bins of equal count", "A's share of decided prompts",
           xticks=[], yticks=[0, 0.25, 0.5, 0.75, 1])
    p, width = f.parts, 0.7 * (f.x(1) - f.x(0))
    p.append(f'<line x1="{f.left}" x2="{f.right}" y1="{f.y(0.5):.1f}" y2="{f.y(0.5):.1f}" stroke="#999" '
             'stroke-dasharray="4 3"/>')
    fitted = []
    for i, b in enumerate(bins):
        wins = sum(won for _, won in b)
        lo, hi = wilson_interval(wins, len(b))
        cx = f.x(i)
        p.append(f'<rect x="{cx - width / 2:.1f}" y="{f.y(wins / len(b)):.1f}" width="{width:.1f}" '
                 f'height="{f.y(0) - f.y(wins / len(b)):.1f}" fill="{COLORS["a"]}" fill-opacity="0.35" stroke="{COLORS["a"]}"/>'
                 f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{f.y(lo):.1f}" y2="{f.y(hi):.1f}" stroke="#333"/>'
                 f'<text x="{cx:.1f}" y="{f.bottom + 14}" text-anchor="middle">{b[0][0]:g}..{b[-1][0]:g}</text>'
                 f'<text x="{cx:.1f}" y="{f.bottom + 27}" text-anchor="middle">n={len(b)}</text>')
        if model:
            median = statistics.median(d for d, _ in b)
            z = model["intercept"] + model["slope"] * (math.tanh(median / model["sd_delta_tokens"])
                                                       if model["sd_delta_tokens"] else 0.0)
            fitted.append((cx, f.y(1 / (1 + math.exp(-z)))))
    if fitted:
        p.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in fitted)}" fill="none" '
                 'stroke="#1f4fbf" stroke-width="2"/>'
                 + "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#1f4fbf"/>' for x, y in fitted))
    return f.svg("A's share of decided prompts by length difference")


def histogram_chart(deltas, unit):
    """Chosen minus rejected length (whole numbers) over the pairs, in at most 20 bins of equal whole width centred
    on whole numbers; green where the chosen answer is longer, red where shorter, grey for the same length."""
    if not deltas:
        return ""
    width = max(1, math.ceil((max(deltas) - min(deltas) + 1) / 20))
    lo = min(deltas) - width / 2
    counts = [0] * (int((max(deltas) - lo) // width) + 1)
    for d in deltas:
        counts[int((d - lo) // width)] += 1
    f = Frame(520, 280, (lo, lo + len(counts) * width), (0, max(counts) * 1.1))
    f.axes(f"\u0394 length (chosen \u2212 rejected), {unit}", "pairs",
           xticks=[t for t in ticks(*f.xlim) if t == round(t)])
    for i, c in enumerate(counts):
        left = lo + i * width
        colour = COLORS["a"] if left > 0 else COLORS["b"] if left + width < 0 else COLORS["tie"]
        bar = max(1.0, f.x(left + width) - f.x(left) - 2)
        f.parts.append(f'<rect x="{f.x(left) + 1:.1f}" y="{f.y(c):.1f}" width="{bar:.1f}" '
                       f'height="{f.y(0) - f.y(c):.1f}" fill="{colour}" fill-opacity="0.6"/>')
    if lo <= 0 <= lo + len(counts) * width:
        f.parts.append(f'<line x1="{f.x(0):.1f}" x2="{f.x(0):.1f}" y1="{f.top}" y2="{f.bottom}" stroke="#333" '
                       'stroke-dasharray="4 3"/>')
    return f.svg("length difference of the pairs")


def forest_chart(rows):
    """Raw (Wilson) and length-controlled (bootstrap) win rates with their intervals, one band per comparison."""
    f = Frame(640, 60 + 44 * len(rows), (0, 1), (len(rows), 0), left=14, bottom=40)
    f.axes("win rate of A (ties excluded): raw with Wilson 95%, length-controlled with bootstrap 95%", "",
           yticks=[])
    p = f.parts
    p.append(f'<line x1="{f.x(0.5):.1f}" x2="{f.x(0.5):.1f}" y1="{f.top}" y2="{f.bottom}" stroke="#999" '
             'stroke-dasharray="4 3"/>')
    for i, (label, s) in enumerate(rows):
        for offset, rate, ci, colour in ((0.35, s.get("win_rate"), s.get("ci95"), "#333"),
                                         (0.65, s.get("lc_win_rate"), s.get("lc_ci95"), "#1f4fbf")):
            y = f.y(i + offset)
            if finite(rate) is not None:
                if interval(ci) != "n/a":
                    p.append(f'<line x1="{f.x(ci[0]):.1f}" x2="{f.x(ci[1]):.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                             f'stroke="{colour}" stroke-width="2"/>')
                p.append(f'<circle cx="{f.x(rate):.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>')
        p.append(f'<text x="{f.left + 4}" y="{f.y(i) + 12:.1f}">{esc(label)}: raw (black), LC (blue)</text>')
    return f.svg("win rates with intervals")


# -----------------------------------------------------------------------------
# The pages

def read_summary(out_dir: Path, what: str) -> dict:
    path = out_dir / "summary.json"
    if not path.exists():
        raise InputError(f"{out_dir}: no summary.json (is it {what}'s --out, and has it finished?)")
    return read_json(path)


def eval_rows(out_dir: Path):
    """per_prompt.jsonl as the page's rows, and the length unit: tokens where every row has them (runs before
    lengths were recorded fall back to characters)."""
    path = out_dir / "per_prompt.jsonl"
    raw = read_jsonl(path, torn_ok=True) if path.exists() else []
    tokens = all(isinstance(r.get("tokens_a"), int) and isinstance(r.get("tokens_b"), int) for r in raw)
    unit = "tokens" if tokens else "chars"
    rows = []
    for i, r in enumerate(raw):
        a, b = r.get("response_a") or "", r.get("response_b") or ""
        rows.append(dict(i=i, id=str(r.get("prompt_id")), p=messages(r.get("prompt") or ""), a=a, b=b,
                         sa=finite(r.get("score_a")), sb=finite(r.get("score_b")), w=r.get("winner", "skipped"),
                         ta=r["tokens_a"] if tokens else len(a), tb=r["tokens_b"] if tokens else len(b),
                         fa=r.get("finished_a"), fb=r.get("finished_b")))
    return rows, unit


def model_lines(summary, settings, side):
    """Who side A or B is: the summary's models entry, or what run_settings.json recorded."""
    m = (summary.get("models") or {}).get(side) or {
        "model": settings.get(f"--model-{side}"), "adapters": settings.get(f"--adapter-{side}"),
        "responses": settings.get(f"--responses-{side}")}
    parts = [str(m["model"])] if m.get("model") else []
    parts += [f"+ adapter {a}" for a in m.get("adapters") or []]
    parts += [f"via {m['policy_url']}"] if m.get("policy_url") else []
    parts += [f"stored responses {m['responses']}"] if m.get("responses") else []
    return " ".join(parts) or "n/a"


def write_eval_report(out_dir) -> Path:
    """<out_dir>/report.html for an eval_winrate.py run: headline numbers, length charts, every prompt."""
    out_dir = Path(out_dir)
    s = read_summary(out_dir, "eval_winrate.py")
    settings = read_json(out_dir / "run_settings.json") if (out_dir / "run_settings.json").exists() else {}
    rows, unit = eval_rows(out_dir)
    name_a, name_b = str(s.get("name_a", "A")), str(s.get("name_b", "B"))
    lengths = s.get("lengths") or {}
    boot = s.get("bootstrap") or {}
    boot_note = f"{boot.get('resamples')} paired resamples over prompts, seed {boot.get('seed')}" if boot else "n/a"
    lc = s.get("lc_win_rate")
    cards = [
        card("win rate (ties excluded)", num(s.get("win_rate")), f"Wilson 95% {interval(s.get('ci95'))}",
             f"bootstrap 95% {interval(s.get('bootstrap_ci95'))}"),
        card("length-controlled win rate", num(lc), f"bootstrap 95% {interval(s.get('lc_ci95'))}",
             "fitted rate at \u0394 tokens = 0"),
        card(f"{name_a} wins / {name_b} wins / ties", f"{s.get('wins', 'n/a')} / {s.get('losses', 'n/a')} / "
             f"{s.get('ties', 'n/a')}", f"{s.get('n', 'n/a')} scored prompts, {s.get('skipped', 0)} skipped",
             f"margin-weighted win rate {num(s.get('margin_weighted_win_rate'))}"),
        card("mean reward A / B", f"{num(s.get('mean_reward_a'))} / {num(s.get('mean_reward_b'))}",
             f"reward: {s.get('reward', 'n/a')}"),
    ]
    length_rows = "".join(
        f"<tr><th>{esc(name)}</th><td class=num>{num((lengths.get(k) or {}).get('mean_tokens'), 1)}</td>"
        f"<td class=num>{num((lengths.get(k) or {}).get('median_tokens'), 1)}</td>"
        f"<td class=num>{share((lengths.get(k) or {}).get('empty_share'))}</td>"
        f"<td class=num>{share((lengths.get(k) or {}).get('truncated_share'))}</td></tr>"
        for k, name in (("a", name_a), ("b", name_b)))
    sampling = s.get("sampling") or {}
    who = kv_table([(f"A = {name_a}", model_lines(s, settings, "a")), (f"B = {name_b}", model_lines(s, settings, "b")),
                    ("reward", s.get("reward", "n/a")), ("tie when", f"|margin| <= {settings.get('--tie-eps', 0)}"),
                    ("sampling", ", ".join(f"{k} {v}" for k, v in sampling.items()) or "n/a"), ("bootstrap", boot_note)])
    points = [(r["ta"] - r["tb"], r["sa"] - r["sb"], r["w"]) for r in rows if None not in (r["sa"], r["sb"])]
    decided = [(r["ta"] - r["tb"], r["w"] == "a") for r in rows if r["w"] in ("a", "b")]
    model = s.get("length_model") if unit == "tokens" else None
    counts = defaultdict(int, {w: sum(r["w"] == w for r in rows) for w in COLORS})
    buttons = [("verdict", "all", f"all {len(rows)}"), ("verdict", "win", f"{name_a} wins {counts['a']}"),
               ("verdict", "loss", f"{name_b} wins {counts['b']}"), ("verdict", "tie", f"ties {counts['tie']}"),
               ("verdict", "skipped", f"skipped {counts['skipped']}")]
    sorts = [("order", "prompt order"), ("margin", "margin (A \u2212 B)"), ("dlen", "\u0394 length (A \u2212 B)"),
             ("len_a", f"length of {name_a}"), ("len_b", f"length of {name_b}")]
    body = f"""<h1>{esc(name_a)} vs {esc(name_b)}</h1>
<div class="muted">win rate of A = {esc(name_a)} over B = {esc(name_b)} on {len(rows)} prompts, judged by {esc(s.get('reward', 'n/a'))}</div>
<div class="cards">{''.join(cards)}</div>
<div class="charts"><div>{who}{settings_details(out_dir)}</div>
<div><table class="grid"><tr><th>answer length, tokens</th><th class=num>mean</th><th class=num>median</th><th class=num>empty</th>
<th class=num>cut at max tokens</th></tr>{length_rows}</table></div></div>
<div class="charts"><figure>{scatter_chart(points, unit)}<figcaption>Each dot is a prompt: green {esc(name_a)} wins, red {esc(name_b)} wins,
grey tie. Dots rising to the right mean the reward prefers the longer answer.</figcaption></figure>
<figure>{win_share_chart(decided, unit, model)}<figcaption>Bars: {esc(name_a)}'s share of the decided prompts in each
length bin (Wilson 95%); blue: the length model's fit at each bin's median. If the bars climb from left to right,
part of the raw win rate is a length effect; the length-controlled rate is the fit's value at equal lengths.</figcaption></figure></div>
<h2>Every prompt</h2>
{controls(buttons, sorts)}
{footer(f"{out_dir.resolve()}: summary.json, per_prompt.jsonl.", "report.html#verdict=loss&q=word&sort=margin&dir=asc")}"""
    data = dict(name_a=name_a, name_b=name_b, unit=unit, page=PAGE_ROWS, rows=rows)
    path = out_dir / "report.html"
    write_text(path, page(f"{name_a} vs {name_b}: nanoalign eval", body, data, LIST_JS + EVAL_JS))
    return path


def answer_tokens(sample):
    """A sample's answer length as pairs.jsonl counts it: samples.jsonl's n_tokens holds the stop token of a finished
    answer, the pairs' *_tokens do not."""
    n = sample.get("n_tokens")
    return n - bool(sample.get("finished")) if isinstance(n, int) else None


def pair_rows(out_dir: Path):
    """pairs.jsonl as the page's rows, each with the prompt's other samples (from samples.jsonl), best first."""
    pairs = read_jsonl(out_dir / "pairs.jsonl") if (out_dir / "pairs.jsonl").exists() else []
    samples = defaultdict(list)
    if (out_dir / "samples.jsonl").exists():
        for r in read_jsonl(out_dir / "samples.jsonl", torn_ok=True):
            samples[str(r.get("prompt_id"))].append(r)
    rows = []
    for i, p in enumerate(pairs):
        pid = str(p.get("prompt_id"))
        others = sorted(samples[pid], key=lambda r: -(finite(r.get("score")) or -math.inf))
        tokens = {}
        for side in ("chosen", "rejected"):  # take the pair's own two answers out of the other samples
            hit = next((r for r in others if (r.get("response"), r.get("score")) == (p[side], p[f"score_{side}"])), None)
            if hit is not None:
                others.remove(hit)
            tokens[side] = p.get(f"{side}_tokens", answer_tokens(hit) if hit else None)
        rows.append(dict(i=i, id=pid, p=messages(p.get("prompt") or ""), c=p["chosen"], r=p["rejected"],
                         sc=finite(p.get("score_chosen")), sr=finite(p.get("score_rejected")),
                         tc=tokens["chosen"], tr=tokens["rejected"], fc=p.get("chosen_finished"),
                         fr=p.get("rejected_finished"),
                         o=[[finite(r.get("score")), answer_tokens(r), r.get("finished"), r.get("response") or ""]
                            for r in others]))
    return rows


def write_pairs_report(out_dir) -> Path:
    """<out_dir>/report.html for a gen_synthetic.py run: the counts, the pairs' lengths, every pair."""
    out_dir = Path(out_dir)
    s = read_summary(out_dir, "gen_synthetic.py")
    rows = pair_rows(out_dir)
    lengths = s.get("pair_lengths") or {}
    dropped = [f"{k.replace('_', ' ')}: {s[k]}" for k in ("unusable_samples", "prompts_below_gap", "pairs_too_similar",
                                                          "skipped") if s.get(k)]
    cards = [
        card("pairs", s.get("pairs", len(rows)),
             f"from {s.get('prompts', 'n/a')} prompts, {s.get('samples', 'n/a')} samples"),
        card("prompts without a pair", sum(s.get(k) or 0 for k in ("prompts_below_gap", "pairs_too_similar")),
             "; ".join(dropped) or "nothing dropped"),
        card("mean sample score", num(s.get("mean_score")), f"{s.get('truncated', 'n/a')} cut at max tokens, "
             f"{s.get('empty', 'n/a')} empty"),
        card("chosen / rejected length", f"{num(lengths.get('mean_chosen_tokens'), 1)} / "
             f"{num(lengths.get('mean_rejected_tokens'), 1)}", "mean tokens",
             f"chosen longer in {share(lengths.get('chosen_longer_share'))} of pairs, median \u0394 "
             f"{num(lengths.get('median_delta_tokens'), 1)}"),
    ]
    deltas = [r["tc"] - r["tr"] for r in rows if isinstance(r["tc"], int) and isinstance(r["tr"], int)]
    buttons = [("longer", "all", f"all {len(rows)}"),
               ("longer", "chosen", f"chosen longer {sum(d > 0 for d in deltas)}"),
               ("longer", "rejected", f"rejected longer {sum(d < 0 for d in deltas)}"),
               ("longer", "same", f"same length {sum(d == 0 for d in deltas)}")]
    sorts = [("order", "prompt order"), ("gap", "score gap"), ("dlen", "\u0394 length (chosen \u2212 rejected)"),
             ("len_chosen", "chosen length"), ("len_rejected", "rejected length")]
    body = f"""<h1>Synthetic preference pairs</h1>
<div class="muted">{esc(out_dir.resolve())}: the highest- and lowest-scored sample of each prompt</div>
<div class="cards">{''.join(cards)}</div>
<div class="charts"><div>{settings_details(out_dir)}</div>
<figure>{histogram_chart(deltas, "tokens")}<figcaption>Pairs whose chosen answer is systematically longer teach DPO
to write longer answers (green: chosen longer).</figcaption></figure></div>
<h2>Every pair</h2>
{controls(buttons, sorts)}
{footer(f"{out_dir.resolve()}: summary.json, pairs.jsonl, samples.jsonl.", "report.html#longer=chosen&sort=gap")}"""
    data = dict(unit="tokens", page=PAGE_ROWS, rows=rows)
    path = out_dir / "report.html"
    write_text(path, page("synthetic pairs: nanoalign", body, data, LIST_JS + PAIRS_JS))
    return path


def write_compare(eval_dirs, out) -> Path:
    """One page over several eval dirs: a row each (rates, intervals, W/L/T, lengths, rewards) linking to its
    report.html (written first where missing), and the rates with their intervals as a chart."""
    out = Path(out)
    rows = []
    for d in map(Path, eval_dirs):
        s = read_summary(d, "eval_winrate.py")
        if not (d / "report.html").exists():
            write_eval_report(d)
        link = quote(os.path.relpath(d / "report.html", out.resolve().parent).replace(os.sep, "/"))
        rows.append((f"{s.get('name_a', 'A')} vs {s.get('name_b', 'B')}", s, link))
    lengths = lambda s, k: num(((s.get("lengths") or {}).get(k) or {}).get("mean_tokens"), 1)  # noqa: E731
    table = "".join(
        f'<tr><td><a href="{esc(link)}">{esc(label)}</a></td><td class=num>{s.get("n", "n/a")}</td>'
        f"<td class=num><b>{num(s.get('win_rate'))}</b></td><td class=num>{interval(s.get('ci95'))}</td>"
        f"<td class=num>{interval(s.get('bootstrap_ci95'))}</td><td class=num><b>{num(s.get('lc_win_rate'))}</b></td>"
        f"<td class=num>{interval(s.get('lc_ci95'))}</td>"
        f"<td class=num>{s.get('wins', 'n/a')}/{s.get('losses', 'n/a')}/{s.get('ties', 'n/a')}</td>"
        f"<td class=num>{s.get('skipped', 0)}</td><td class=num>{lengths(s, 'a')} / {lengths(s, 'b')}</td>"
        f"<td class=num>{num(s.get('mean_reward_a'))} / {num(s.get('mean_reward_b'))}</td></tr>"
        for label, s, link in rows)
    body = f"""<h1>Win rates</h1>
<div class="muted">{len(rows)} evaluations; each name opens its own report.</div>
<table class="grid" id="compare"><tr><th>A vs B</th><th class=num>prompts</th><th class=num>win rate</th>
<th class=num>Wilson 95%</th><th class=num>bootstrap 95%</th><th class=num>LC win rate</th><th class=num>LC bootstrap 95%</th>
<th class=num>W/L/T</th><th class=num>skipped</th><th class=num>mean tokens A / B</th><th class=num>mean reward A / B</th></tr>
{table}</table>
<div class="charts" style="margin-top:16px">{forest_chart([(label, s) for label, s, _ in rows])}</div>
<p class="sub">Win rate: A's wins over decided prompts (ties excluded). LC: length-controlled, the fitted rate at
equal answer lengths (AlpacaEval 2.0 style). Written by nanoalign.pages.</p>"""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, page("win rates: nanoalign", body))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanoalign.pages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="eval_winrate.py --out dirs (summary.json, per_prompt.jsonl)")
    parser.add_argument("--out", default="compare.html", help="the comparison page (links to each dir's report.html)")
    args = parser.parse_args(argv)
    try:
        print(write_compare(args.dirs, args.out))
    except InputError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
