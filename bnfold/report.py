"""Rendering of reports: a short text table a person reads at a glance, and the JSON document."""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

from .core.results import Report, Verification


def to_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=False, default=_default, allow_nan=False)


def _default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def json_safe(doc: Any) -> Any:
    """Replace non-finite floats (not valid JSON) by strings."""
    if isinstance(doc, dict):
        return {k: json_safe(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [json_safe(v) for v in doc]
    if isinstance(doc, float) and doc != doc:
        return "nan"
    if isinstance(doc, float) and doc in (float("inf"), float("-inf")):
        return "inf" if doc > 0 else "-inf"
    return doc


def _g(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) else str(x)


def verification_lines(v: Verification | None) -> list[str]:
    if v is None or v.skipped_reason is not None:
        return [f"verification   not run ({v.skipped_reason if v else 'off'})"]
    lines = []
    verdict = {"passed": "PASSED", "failed": "FAILED", "inconclusive": "INCONCLUSIVE (nothing was proven)",
               None: "NOT RUN (no provider could run)"}[v.verdict]
    if v.proofs:
        total = sum(v.proofs.values())
        verdict += f"   {v.proofs.get('proven', 0)} of {total} fold(s) proven locally"
        if v.proofs.get("failed"):
            verdict += f", {v.proofs['failed']} failed"
    lines.append(f"verification   {verdict}")
    for name, d in v.inputs.items():
        shape = "x".join(str(n) for n in d.get("shape", []))
        lines.append(f"  input {name!r:<20} {shape} {d.get('dtype', '')}: {d.get('how', '')}")
    for name, p in v.providers.items():
        if not p.ran:
            lines.append(f"  {name:<26} not run: {p.why}")
            continue
        worst = max(p.outputs.items(), key=lambda kv: (not kv[1].get("passed", False),
                                                       kv[1].get("verdict") == "inconclusive",
                                                       kv[1].get("max_abs", 0) / (kv[1].get("atol") or 1e-300)))
        oname, st = worst
        tag = {"passed": "ok ", "failed": "BAD", "inconclusive": "???"}.get(p.verdict or "", "   ")
        lines.append(f"  {name:<26} {tag} {len(p.outputs)} output(s); worst {oname!r}: max abs {_g(st.get('max_abs'))}"
                     f" (rel {_g(st.get('max_rel'))}) vs atol {_g(st.get('atol'))}"
                     f" [{st.get('how')}; noise {_g(st.get('noise_max_abs'))}]")
        for k, st2 in p.outputs.items():
            if st2.get("inconclusive"):
                lines.append("  " + " " * 26 + f" {k!r} proves nothing: {st2['inconclusive']}")
            if st2.get("unstable"):
                lines.append("  " + " " * 26 + f" {k!r}: {st2['unstable']}")
        if p.notes.get("folds_in_candidate"):
            lines.append("  " + " " * 26 + f" {len(p.notes['folds_in_candidate'])} tensor(s) carry a fold the "
                         "candidate made itself (same name, the value after the BatchNorm): not a divergence")
        if p.notes.get("tf32"):
            lines.append("  " + " " * 26 + " TF32 convolutions on: tolerance includes the TF32 on/off difference")
    if v.first_divergence:
        fd = v.first_divergence
        size = f"max abs {_g(fd.get('max_abs'))} > atol {_g(fd.get('atol'))}"
        if fd.get("tensor"):  # ONNX: a tensor and the node computing it
            lines.append(f"  first divergence: tensor {fd['tensor']!r} from {fd.get('op') or ''} {fd.get('node')!r}"
                         f" ({size}, {fd.get('provider')})")
        elif fd.get("layer"):  # PyTorch module path / Keras layer name
            kind = f" ({fd['module']})" if fd.get("module") else ""
            lines.append(f"  first divergence: layer {fd['layer']!r}{kind} ({size}, {fd.get('device')})")
        else:
            lines.append(f"  first divergence: not located ({fd.get('why') or 'no layer of both models differs'})")
    for b in v.blame:
        lines.append(f"  blamed fold {b['bn']!r}: {b.get('why', '')}")
    if v.hint():
        lines.append(f"  hint: {v.hint()}")
    return lines


def name(d: Any) -> str:
    """A BatchNorm as a person knows it: the module path the exporter recorded, else its node name."""
    return d.extra.get("module_path") or d.bn


def fmt_count(n: Any) -> str:
    """A count made short: 12.3k, 4.56M."""
    if not isinstance(n, (int, float)):
        return "?"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def fmt_bytes(n: Any) -> str:
    """A size in bytes made short: 4.2 MiB."""
    if not isinstance(n, (int, float)):
        return "?"
    for div, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n} B"


def fmt_change(pair: Any, fmt: Any = fmt_count) -> str:
    """[before, after] as "before -> after (+x%)"."""
    before, after = (list(pair) + [None, None])[:2] if isinstance(pair, (list, tuple)) else (None, None)
    if after is None:
        return f"{fmt(before)} -> (not written)" if before is not None else "?"
    pct = f" ({(after - before) / before * 100:+.1f}%)" if before and isinstance(after, (int, float)) else ""
    return f"{fmt(before)} -> {fmt(after)}{pct}"


def before_after_lines(ba: dict[str, Any] | None) -> list[str]:
    """Op counts that changed, parameters, file size and (--bench) latency, before -> after."""
    if not ba:
        return []
    out = []
    if ba.get("ops"):
        out.append("ops            " + " · ".join(f"{op} {b} -> {a}" for op, (b, a) in ba["ops"].items()))
    elif ba.get("parameters", [None, None])[1] is not None:
        out.append("ops            unchanged")
    out.append(f"parameters     {fmt_change(ba.get('parameters'))}")
    out.append(f"file size      {fmt_change(ba.get('file_bytes'), fmt_bytes)}")
    lat = ba.get("latency_ms")
    if isinstance(lat, dict) and "not_measured" in lat:
        out.append(f"latency        not measured: {lat['not_measured']}")
    elif isinstance(lat, dict):
        for prov, m in lat.items():
            if not m.get("ran"):
                out.append(f"latency        {prov}: not run: {m.get('why')}")
                continue
            sp = m.get("speedup")
            out.append(f"latency        {prov}: {m['original_ms']:.3g} ms -> {m['folded_ms']:.3g} ms"
                       f"{f', {sp:.2f}x' if sp else ''} (median of {m['runs']} runs each, {m['optimization']})")
    return out


def text(report: Report) -> str:
    """The human summary of one fold."""
    out = []
    src = report.model or "(in-memory model)"
    dst = report.output or ("nothing written" if report.info.get("dry_run") else "not written")
    out.append(f"{src} -> {dst}   [{report.framework}]")
    n = len(report.decisions)
    out.append(f"BatchNorm      {n} found")
    folded, skipped = report.folded, report.skipped  # (each a pass over every decision: asked once)
    by_pattern = Counter(d.pattern for d in folded)
    dirs = Counter(d.direction for d in folded)
    extra = "" if set(dirs) <= {"after"} else f" ({', '.join(f'{k} {v}' for k, v in dirs.items())})"
    out.append(f"folded         {len(folded)}" + (
        "   " + " · ".join(f"{p} {c}" for p, c in by_pattern.most_common()) if by_pattern else "") + extra)
    out.append(f"skipped        {len(skipped)}")
    by_reason: dict[str, list] = {}
    for d in skipped:
        by_reason.setdefault(d.reason.value if d.reason else "?", []).append(d)
    for reason, ds in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        shown = "; ".join(f"{name(d)}: {d.detail}" for d in ds[:3])
        more = f"; +{len(ds) - 3} more" if len(ds) > 3 else ""
        out.append(f"  {reason:<28} {len(ds):>3}  {shown}{more}")
    if report.info.get("dry_run"):
        out.append("every BatchNorm (--dry-run):")
        for d in report.decisions:
            nb = d.extra.get("neighbourhood") or {}
            where = f"   [{nb.get('input', '?')} -> BN -> {', '.join(nb.get('feeds', [])) or '?'}]" if nb else ""
            into = d.extra.get("into_module_path") or d.producer
            what = (f"folds into {into} ({d.pattern}, {d.direction})" if d.is_folded
                    else f"kept: {d.reason.value if d.reason else '?'}")
            node = f" [{d.bn}]" if name(d) != d.bn else ""
            out.append(f"  {name(d)}{node}: {what}{where}")
    for k, v in report.info.items():
        if k not in ("dry_run",):
            out.append(f"{k:<14} {v}")
    out.extend(before_after_lines(report.before_after))
    out.extend(verification_lines(report.verification))
    if report.timing_s:
        out.append("time           " + " · ".join(f"{k} {v:.2f}s" for k, v in report.timing_s.items()))
    return "\n".join(out)


def summary_table(rows: list[dict[str, Any]], ignored: list[dict[str, str]],
                  errors: list[dict[str, Any]] = ()) -> str:  # type: ignore[assignment]
    """The end of a batch: one line per model (status, BatchNorms folded, parameters, size, speed-up)."""
    states = Counter("error" if r.get("error") else r["status"].split(":")[0] for r in rows)
    head = f"summary        {len(rows)} model(s): " + (", ".join(f"{n} {s}" for s, n in states.items()) or "none")
    if ignored:
        head += f" · {len(ignored)} file(s) left out"
    out = [head]
    width = min(48, max([len(r["model"]) for r in rows] + [5]))
    for r in rows:
        if r.get("error"):
            out.append(f"  {r['model']:<{width}}  ERROR  {r['error']['message']}")
            continue
        cells = [r["status"]]
        if "bn" in r:
            cells.append(f"BN {r['folded']}/{r['bn']} folded")
        ba = r.get("before_after") or {}
        if ba.get("parameters", [None, None])[1] is not None:
            cells.append(f"params {fmt_change(ba['parameters'])}")
        if ba.get("file_bytes", [None, None])[1] is not None:
            cells.append(f"size {fmt_change(ba['file_bytes'], fmt_bytes)}")
        lat = ba.get("latency_ms") or {}
        speed = [f"{p.replace('ExecutionProvider', '')} {m['speedup']:.2f}x" for p, m in lat.items()
                 if isinstance(m, dict) and m.get("ran") and m.get("speedup")]
        if speed:
            cells.append("speed-up " + ", ".join(speed))
        if r.get("output") and r["status"] in ("written", "up to date") or r["status"].startswith("written"):
            cells.append(f"-> {r['output']}")
        out.append(f"  {r['model']:<{width}}  " + " · ".join(cells))
    for e in errors:
        out.append(f"  error: {e.get('path') + ': ' if e.get('path') else ''}{e['message']}")
    for i in ignored:
        out.append(f"  left out {i['path']}: {i['why']}")
    return "\n".join(out)
