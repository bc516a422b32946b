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


def text(report: Report) -> str:
    """The human summary of one fold."""
    out = []
    src = report.model or "(in-memory model)"
    dst = report.output or ("nothing written" if report.info.get("dry_run") else "not written")
    out.append(f"{src} -> {dst}   [{report.framework}]")
    n = len(report.decisions)
    out.append(f"BatchNorm      {n} found")
    by_pattern = Counter(d.pattern for d in report.folded)
    dirs = Counter(d.direction for d in report.folded)
    extra = "" if set(dirs) <= {"after"} else f" ({', '.join(f'{k} {v}' for k, v in dirs.items())})"
    out.append(f"folded         {len(report.folded)}" + (
        "   " + " · ".join(f"{p} {c}" for p, c in by_pattern.most_common()) if by_pattern else "") + extra)
    out.append(f"skipped        {len(report.skipped)}")
    by_reason: dict[str, list] = {}
    for d in report.skipped:
        by_reason.setdefault(d.reason.value if d.reason else "?", []).append(d)
    for reason, ds in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        shown = "; ".join(f"{d.bn}: {d.detail}" for d in ds[:3])
        more = f"; +{len(ds) - 3} more" if len(ds) > 3 else ""
        out.append(f"  {reason:<28} {len(ds):>3}  {shown}{more}")
    if report.info.get("dry_run"):
        out.append("every BatchNorm (--dry-run):")
        for d in report.decisions:
            nb = d.extra.get("neighbourhood") or {}
            where = f"   [{nb.get('input', '?')} -> BN -> {', '.join(nb.get('feeds', [])) or '?'}]" if nb else ""
            what = (f"folds into {d.producer} ({d.pattern}, {d.direction})" if d.is_folded
                    else f"kept: {d.reason.value if d.reason else '?'}")
            out.append(f"  {d.bn}: {what}{where}")
    for k, v in report.info.items():
        if k not in ("dry_run",):
            out.append(f"{k:<14} {v}")
    out.extend(verification_lines(report.verification))
    if report.timing_s:
        out.append("time           " + " · ".join(f"{k} {v:.2f}s" for k, v in report.timing_s.items()))
    return "\n".join(out)
