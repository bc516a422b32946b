"""--html: one self-contained page (inline CSS, SVG and a few lines of JS; nothing fetched) per run.

It is drawn from the same JSON document --json prints (one report, a batch, or a check), so a saved
JSON renders the same page. For each model: the before/after summary, every BatchNorm decision with
its reason, and the verification as a picture per provider: each compared tensor is one mark, placed by
its depth in the model (topological order) and by its error over its tolerance on a log scale, with
the tolerance as a line and the first divergence marked. A Content-Security-Policy forbids every fetch,
so the page cannot reach the network even if a name in it tried to.
"""
from __future__ import annotations

import html as _html
import math
from typing import Any

from .core.files import atomic_write
from .report import fmt_bytes, fmt_change, fmt_count, json_safe

W, H = 920, 250
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 18, 40
LOG_MIN, LOG_MAX = -6.0, 3.0  # error / tolerance from 1e-6 (and exact) to 1000x

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1000px;padding:16px;
color:#1d1d1f;background:#fff}
h1{font-size:22px;margin:4px 0}h2{font-size:18px;margin:28px 0 6px;border-top:1px solid #ddd;padding-top:14px}
h3{font-size:15px;margin:16px 0 6px}code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
table{border-collapse:collapse;width:100%;margin:6px 0}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eee;vertical-align:top}
th{background:#f6f6f7;font-weight:600}.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px;color:#fff}
.v-passed{background:#2e7d32}.v-failed{background:#c62828}.v-inconclusive{background:#ef6c00}.v-none{background:#757575}
.v-error{background:#6a1b9a}tr.folded td.st{color:#2e7d32}tr.skipped td.st{color:#b26a00}
.muted{color:#666}.filters button{margin-right:6px;border:1px solid #ccc;background:#fafafa;border-radius:4px;
padding:2px 10px;cursor:pointer}.filters button.on{background:#1d1d1f;color:#fff}
svg.profile{width:100%;height:auto;background:#fcfcfd;border:1px solid #eee}svg .grid{stroke:#e6e6e6}
svg .tol{stroke:#c62828;stroke-dasharray:5 4}svg .axis{font-size:11px;fill:#555}
svg .mark.ok{fill:#2e7d32}svg .mark.bad{fill:#c62828}svg .mark.explained{fill:#ef6c00}
svg .mark.after{fill:#9e9e9e}svg .mark.exact{fill:none;stroke:#2e7d32}svg .divline{stroke:#c62828;stroke-width:1.5}
svg .divlabel{font-size:11px;fill:#c62828;font-weight:600}
"""

JS = """
(function(){
  document.querySelectorAll('.filters').forEach(function(f){
    var table=document.getElementById(f.dataset.table);
    f.querySelectorAll('button').forEach(function(b){
      b.addEventListener('click',function(){
        f.querySelectorAll('button').forEach(function(x){x.classList.remove('on');});
        b.classList.add('on');
        table.querySelectorAll('tr.decision').forEach(function(r){
          r.style.display=(b.dataset.show==='all'||r.classList.contains(b.dataset.show))?'':'none';});
      });
    });
  });
  document.body.dataset.rendered='yes';
})();
"""


def e(x: Any) -> str:
    """HTML-escaped text (every name in a report comes from a user's file)."""
    return _html.escape("" if x is None else str(x), quote=True)


def _g(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) else e(x)


def _badge(verdict: str | None, text: str | None = None) -> str:
    v = verdict or "none"
    return f'<span class="badge v-{e(v)}">{e(text or (verdict or "not run").upper())}</span>'


def page(doc: dict[str, Any]) -> str:
    """The HTML page for a --json document (a report, a batch of reports, or a check)."""
    from . import __version__
    doc = json_safe(doc)
    if "reports" in doc:
        reports, title = doc["reports"], "batch"
    elif "candidate" in doc:
        reports, title = [doc], f"{doc.get('original')} vs {doc.get('candidate')}"
    else:
        reports, title = [doc], str(doc.get("model"))
    body = [f"<header><h1>bnfold report</h1><p class=\"muted\">{e(title)} · bnfold {e(__version__)}</p></header>",
            _summary(doc, reports)]
    for k, r in enumerate(reports):
        body.append(_model(r, k))
    if doc.get("errors"):
        body.append("<section id=\"errors\"><h2>Errors</h2><ul>" + "".join(
            f"<li class=\"error\"><code>{e(x.get('path'))}</code>: {e(x.get('message'))}</li>" for x in doc["errors"])
            + "</ul></section>")
    csp = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>bnfold report: {e(title)}</title><style>{CSS}</style></head>\n<body data-rendered=\"no\">\n"
            + "\n".join(body) + f"\n<script>{JS}</script>\n</body></html>\n")


def write_html(doc: dict[str, Any], path: str) -> None:
    """Write page(doc) atomically."""
    text = page(doc)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


# -- summary --------------------------------------------------------------------------------------

def _summary(doc: dict[str, Any], reports: list[dict[str, Any]]) -> str:
    rows = (doc.get("summary") or {}).get("models")
    out = ["<section id=\"summary\"><h2>Summary</h2>"]
    if rows is None:  # one report or a check
        r = reports[0]
        ver = r.get("verification") or {}
        if "candidate" in r:
            out.append(f"<p>{_badge(ver.get('verdict'))} is <code>{e(r['candidate'])}</code> the same function as "
                       f"<code>{e(r['original'])}</code>?</p>")
        else:
            out.append(f"<p>{_badge(ver.get('verdict'))} <code>{e(r.get('model'))}</code> → "
                       f"<code>{e(r.get('output') or 'not written')}</code> · {len(r.get('folded', []))} of "
                       f"{len(r.get('folded', [])) + len(r.get('skipped', []))} BatchNorm folded</p>")
        return "".join(out) + "</section>"
    out.append("<table class=\"models\"><tr><th>model</th><th>status</th><th class=\"num\">BatchNorm folded</th>"
               "<th>parameters</th><th>file size</th><th>output</th></tr>")
    for row in rows:
        ba = row.get("before_after") or {}
        verdict = "error" if row.get("error") else row.get("verdict")
        status = row["error"]["message"] if row.get("error") else row.get("status")
        label = verdict or ("up to date" if status == "up to date" else "not verified")
        folded = f"{row['folded']} / {row['bn']}" if "bn" in row else ""
        out.append(f"<tr class=\"model-row\"><td><code>{e(row['model'])}</code></td><td>{_badge(verdict, label)} "
                   f"{e(status)}</td><td class=\"num\">{e(folded)}</td>"
                   f"<td>{e(fmt_change(ba['parameters'])) if ba else ''}"
                   f"</td><td>{e(fmt_change(ba['file_bytes'], fmt_bytes)) if ba else ''}</td>"
                   f"<td><code>{e(row.get('output') or '')}</code></td></tr>")
    out.append("</table>")
    ignored = (doc.get("summary") or {}).get("ignored") or []
    if ignored:
        out.append("<p class=\"muted\">Left out (bnfold's own outputs):</p><ul class=\"ignored\">" + "".join(
            f"<li><code>{e(i['path'])}</code>: {e(i['why'])}</li>" for i in ignored) + "</ul>")
    return "".join(out) + "</section>"


# -- one model ------------------------------------------------------------------------------------

def _model(r: dict[str, Any], k: int) -> str:
    ver = r.get("verification") or {}
    head = (f"{e(r.get('original'))} vs {e(r.get('candidate'))}" if "candidate" in r
            else f"{e(r.get('model'))} → {e(r.get('output') or 'not written')}")
    out = [f"<section class=\"model\" id=\"model-{k}\"><h2>{head} {_badge(ver.get('verdict'))}</h2>"]
    if "framework" in r:
        out.append(f"<p class=\"muted\">framework {e(r['framework'])}"
                   + "".join(f" · {e(key)} {_g(v)} s" for key, v in (r.get("timing_s") or {}).items()) + "</p>")
    out.append(_before_after(r.get("before_after")))
    if "folded" in r:
        out.append(_decisions(r, k))
    out.append(_verification(ver, k))
    return "".join(out) + "</section>"


def _before_after(ba: dict[str, Any] | None) -> str:
    if not ba:
        return ""
    rows = [f"<tr><td>{e(op)}</td><td class=\"num\">{b}</td><td class=\"num\">{a}</td></tr>"
            for op, (b, a) in (ba.get("ops") or {}).items()]
    p, f = ba.get("parameters") or [None, None], ba.get("file_bytes") or [None, None]
    rows.append(f"<tr><td>parameters</td><td class=\"num\">{e(fmt_count(p[0]))}</td><td class=\"num\">"
                f"{e(fmt_count(p[1]) if p[1] is not None else 'not written')}</td></tr>")
    rows.append(f"<tr><td>file size</td><td class=\"num\">{e(fmt_bytes(f[0]))}</td><td class=\"num\">"
                f"{e(fmt_bytes(f[1]) if f[1] is not None else 'not written')}</td></tr>")
    lat = ba.get("latency_ms")
    if isinstance(lat, dict) and "not_measured" not in lat:
        for prov, m in lat.items():
            if m.get("ran"):
                rows.append(f"<tr class=\"latency\"><td>latency, {e(prov)} (median of {m['runs']})</td>"
                            f"<td class=\"num\">{_g(m['original_ms'])} ms</td><td class=\"num\">{_g(m['folded_ms'])} ms"
                            f" ({_g(m.get('speedup'))}x)</td></tr>")
            else:
                rows.append(f"<tr class=\"latency\"><td>latency, {e(prov)}</td><td colspan=\"2\">not run: "
                            f"{e(m.get('why'))}</td></tr>")
    elif isinstance(lat, dict):
        rows.append(f"<tr class=\"latency\"><td>latency</td><td colspan=\"2\">{e(lat['not_measured'])}</td></tr>")
    return ("<h3>Before / after</h3><table class=\"before-after\"><tr><th>what</th><th class=\"num\">before</th>"
            "<th class=\"num\">after</th></tr>" + "".join(rows) + "</table>")


def _decisions(r: dict[str, Any], k: int) -> str:
    folded, skipped = r.get("folded", []), r.get("skipped", [])
    tid = f"decisions-{k}"
    out = [f"<h3>BatchNorm decisions ({len(folded)} folded, {len(skipped)} kept)</h3>",
           f"<div class=\"filters\" data-table=\"{tid}\"><button class=\"on\" data-show=\"all\">all</button>"
           "<button data-show=\"folded\">folded</button><button data-show=\"skipped\">kept</button></div>",
           f"<table class=\"decisions\" id=\"{tid}\"><tr><th>BatchNorm</th><th>what happened</th><th>why / how</th>"
           "<th>local proof</th></tr>"]
    for d in folded:
        proof = d.get("proof") or {}
        pr = ("not run: " + e(proof["not_run"]) if "not_run" in proof else
              f"max abs {_g(proof.get('max_abs'))} ≤ bound {_g(proof.get('bound'))}" if proof else "")
        into = d.get("into_module_path") or d.get("into")
        out.append(f"<tr class=\"decision folded\" data-bn=\"{e(d['bn'])}\"><td>{_bn_name(d)}</td>"
                   f"<td class=\"st\">folded into <code>{e(into)}</code></td><td>{e(d.get('pattern'))}, "
                   f"{e(d.get('direction'))}</td><td>{pr}</td></tr>")
    for d in skipped:
        out.append(f"<tr class=\"decision skipped\" data-bn=\"{e(d['bn'])}\"><td>{_bn_name(d)}</td>"
                   f"<td class=\"st\">kept: <code>{e(d.get('reason'))}</code></td><td>{e(d.get('detail'))}</td>"
                   "<td></td></tr>")
    return "".join(out) + "</table>"


def _bn_name(d: dict[str, Any]) -> str:
    path = d.get("module_path")
    if path and path != d["bn"]:
        return f"<code>{e(path)}</code><br><span class=\"muted mono\">{e(d['bn'])}</span>"
    return f"<code>{e(d['bn'])}</code>"


# -- verification ---------------------------------------------------------------------------------

def _verification(ver: dict[str, Any], k: int) -> str:
    out = ["<h3>Verification</h3>"]
    if ver.get("not_run") and not ver.get("providers"):
        return out[0] + f"<p class=\"muted\">not run: {e(ver['not_run'])}</p>"
    tol = ver.get("tolerance") or {}
    if tol.get("how") == "user":
        rule = f"atol {_g(tol.get('atol'))}, rtol {_g(tol.get('rtol'))} (given)"
    else:
        rule = tol.get("rule") or "derived from the model's own numeric noise"
    out.append(f"<p>{_badge(ver.get('verdict'))} tolerance: <span class=\"mono\">{e(rule)}</span></p>")
    if ver.get("inputs"):
        out.append("<ul class=\"inputs\">" + "".join(
            f"<li><code>{e(n)}</code> {e('x'.join(str(s) for s in d.get('shape', [])))} {e(d.get('dtype'))}: "
            f"{e(d.get('how'))}</li>" for n, d in ver["inputs"].items()) + "</ul>")
    fd = ver.get("first_divergence")
    if fd:
        where = fd.get("tensor") or fd.get("layer")
        out.append(f"<p class=\"divergence\">First divergence: <code>{e(where)}</code> "
                   f"{e(fd.get('op') or fd.get('module') or '')} {e(fd.get('node') or '')} — max abs "
                   f"{_g(fd.get('max_abs'))} &gt; atol {_g(fd.get('atol'))} "
                   f"({e(fd.get('provider') or fd.get('device'))})"
                   "</p>")
    if ver.get("hint"):
        out.append(f"<p class=\"hint\">Hint: {e(ver['hint'])}</p>")
    for j, (name, p) in enumerate((ver.get("providers") or {}).items()):
        if not p.get("ran"):
            out.append(f"<p class=\"provider not-run\" data-provider=\"{e(name)}\"><b>{e(name)}</b>: not run — "
                       f"{e(p.get('why'))}</p>")
            continue
        out.append(_chart(name, p, fd, f"{k}-{j}"))
    return "".join(out)


def marks_of(p: dict[str, Any]) -> list[dict[str, Any]]:
    """The compared tensors of one provider: its depth profile, else its outputs."""
    if isinstance(p.get("profile"), list):
        return p["profile"]
    return [{"tensor": n, "max_abs": st.get("max_abs"), "atol": st.get("atol"), "order": i, "output": True,
             "bad": not st.get("passed")} for i, (n, st) in enumerate((p.get("outputs") or {}).items())]


def _ratio(m: dict[str, Any]) -> float | None:
    """log10(error / tolerance), clamped; None when not a number."""
    a, t = m.get("max_abs"), m.get("atol")
    if isinstance(a, str) and a in ("inf", "nan"):
        return LOG_MAX
    if not isinstance(a, (int, float)):
        return None
    if a == 0:
        return LOG_MIN
    if not isinstance(t, (int, float)) or t <= 0:
        return LOG_MAX
    return max(LOG_MIN, min(LOG_MAX, math.log10(a / t)))


def _chart(provider: str, p: dict[str, Any], fd: dict[str, Any] | None, sid: str) -> str:
    ms = sorted(marks_of(p), key=lambda m: (m.get("order", 0), m.get("tensor", "")))
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    y = lambda v: TOP + (LOG_MAX - v) / (LOG_MAX - LOG_MIN) * ph  # noqa: E731
    x = lambda i: LEFT + (i + 0.5) / max(len(ms), 1) * pw  # noqa: E731
    svg = [f"<svg class=\"profile\" id=\"profile-{sid}\" data-provider=\"{e(provider)}\" data-marks=\"{len(ms)}\" "
           f"viewBox=\"0 0 {W} {H}\" xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" "
           f"aria-label=\"error over tolerance per compared tensor, {e(provider)}\">"]
    for d in range(int(LOG_MIN), int(LOG_MAX) + 1):
        svg.append(f"<line class=\"grid\" x1=\"{LEFT}\" x2=\"{W - RIGHT}\" y1=\"{y(d):.1f}\" y2=\"{y(d):.1f}\"/>"
                   f"<text class=\"axis\" x=\"{LEFT - 6}\" y=\"{y(d) + 4:.1f}\" text-anchor=\"end\">"
                   f"{'0' if d == LOG_MIN else f'1e{d}'}</text>")
    svg.append(f"<line class=\"tol\" x1=\"{LEFT}\" x2=\"{W - RIGHT}\" y1=\"{y(0):.1f}\" y2=\"{y(0):.1f}\"/>"
               f"<text class=\"axis\" x=\"{W - RIGHT - 4}\" y=\"{y(0) - 5:.1f}\" text-anchor=\"end\">tolerance</text>")
    div_x = None
    for i, m in enumerate(ms):
        v = _ratio(m)
        bad = m.get("divergence") or m.get("bad") or (v is not None and v > 0 and not m.get("after_divergence")
                                                      and not m.get("explained"))
        kind = ("after" if m.get("after_divergence") else "explained" if m.get("explained") else
                "bad" if bad else "exact" if m.get("max_abs") == 0 else "ok")
        cls = f"mark {kind}" + (" output" if m.get("output") else "")
        is_div = bool(fd) and m.get("tensor") in (fd.get("tensor"), fd.get("layer")) and \
            (fd.get("provider") or fd.get("device")) in (provider, None)
        if is_div or m.get("divergence"):
            cls += " divergence"
            div_x = x(i)
        yy = y(v) if v is not None else TOP
        tip = (f"{m.get('tensor')} (depth {m.get('order')}): max abs {_g(m.get('max_abs'))} vs atol {_g(m.get('atol'))}"
               + (" · output" if m.get("output") else "") + (f" · {m['explained']}" if m.get("explained") else "")
               + (" · after the first divergence (not judged)" if m.get("after_divergence") else ""))
        svg.append(f"<circle class=\"{cls}\" cx=\"{x(i):.1f}\" cy=\"{yy:.1f}\" r=\"3.2\" "
                   f"data-tensor=\"{e(m.get('tensor'))}\">"
                   f"<title>{e(tip)}</title></circle>")
    if div_x is not None:
        svg.append(f"<g class=\"first-divergence\"><line class=\"divline\" x1=\"{div_x:.1f}\" x2=\"{div_x:.1f}\" "
                   f"y1=\"{TOP}\" y2=\"{TOP + ph}\"/><text class=\"divlabel\" x=\"{div_x + 4:.1f}\" y=\"{TOP + 12}\">"
                   "first divergence</text></g>")
    svg.append(f"<text class=\"axis\" x=\"{LEFT + pw / 2:.0f}\" y=\"{H - 10}\" text-anchor=\"middle\">compared tensors "
               "along the model's depth (topological order) →</text>"
               f"<text class=\"axis\" x=\"12\" y=\"{TOP + ph / 2:.0f}\" "
               f"transform=\"rotate(-90 12 {TOP + ph / 2:.0f})\" "
               "text-anchor=\"middle\">max abs error / tolerance</text></svg>")
    n_bad = sum(1 for m in ms if (_ratio(m) or LOG_MIN) > 0
                and not m.get("explained") and not m.get("after_divergence"))
    cap = (f"<figcaption><b>{e(provider)}</b> {_badge(p.get('verdict'))} {len(ms)} compared tensor(s)"
           f"{'' if 'profile' in p else ' (outputs only: this verifier reports no per-layer profile)'}"
           f"{f', {n_bad} over tolerance' if n_bad else ''}</figcaption>")
    return f"<figure class=\"provider\" data-provider=\"{e(provider)}\">{''.join(svg)}{cap}</figure>"

