"""A self-contained HTML page for an `AuditReport`: inline CSS, plots as base64 PNG, no network.

Everything on the page is drawn from the report's JSON (``report.json``), so ``bastion report
RUN_DIR`` re-renders it without the model or the data: the verdict, the headline numbers, how
the defense was attacked, every attack and check with its evidence, the security curve, the
convergence plot, Madry's loss histogram and the example grid (original / adversarial /
amplified perturbation, with predicted labels). Plots use matplotlib's Agg canvas (no display).
"""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .audit_report import AuditReport

__all__ = ["render_audit"]

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;
     padding:0 1em;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0}
.verdict{font-size:1.15em;padding:.8em 1em;border-radius:6px;border-left:6px solid}
.v-ok{background:#eef8ee;border-color:#2e7d32}.v-warn{background:#fff6e5;border-color:#ef8f00}
.v-bad{background:#fdecea;border-color:#c62828}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:0 .5em;border-radius:3px;font-size:.85em;font-weight:600;color:#fff}
.s-pass{background:#2e7d32}.s-warning{background:#ef8f00}.s-info{background:#1565c0}.s-skipped{background:#888}
.ev{font-size:.85em;color:#555}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em}
ul.choices li{margin:.15em 0}
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * float(v):.1f}%"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(w: float, h: float) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _curve_png(report: "AuditReport") -> str | None:
    pts = report.curve
    if not pts:
        return None
    fig = _figure(6.0, 3.6)
    ax = fig.subplots()
    eps = [p["eps"] for p in pts]
    same = report.adaptive.get("same_as_naive")
    for key, style, label in (("adaptive", "-o", "adaptive" if not same else "naive = adaptive"),
                              ("naive", "--s", "naive")):
        if key == "naive" and same:
            continue
        ys = [p.get(key) for p in pts]
        if any(v is not None for v in ys):
            ax.plot(eps, [100 * v if v is not None else float("nan") for v in ys], style, label=label)
    threat_eps = float(report.threat.partition(":")[2])
    ax.axvline(threat_eps, color="#999", lw=1, ls=":")
    ax.set_xlabel(f"eps ({report.threat.partition(':')[0]})")
    ax.set_ylabel("accuracy under attack (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("Security curve", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _convergence_png(report: "AuditReport") -> str | None:
    conv = report.convergence or {}
    steps, restarts = conv.get("steps") or [], conv.get("restarts") or []
    if not steps and not restarts:
        return None
    fig = _figure(8.0, 3.2)
    a1, a2 = fig.subplots(1, 2)
    values = [100 * a for _, a in steps] + [100 * a for _, a in restarts]
    lo, hi = min(values), max(values)
    pad = max(5.0, (hi - lo) * 0.15)  # at least ±5 points: a flat curve must look flat
    if steps:
        a1.plot([s for s, _ in steps], [100 * a for _, a in steps], "-o")
        a1.set_xscale("log")
        a1.minorticks_off()
        a1.set_xticks([s for s, _ in steps])
        a1.set_xticklabels([str(s) for s, _ in steps])
    a1.set_xlabel("attack steps")
    a1.set_ylabel("accuracy under attack (%)")
    a1.set_title("vs iterations", fontsize=10)
    if restarts:
        a2.plot([r for r, _ in restarts], [100 * a for _, a in restarts], "-o", color="C1")
        a2.set_xticks([r for r, _ in restarts])
    a2.set_xlabel("random restarts")
    a2.set_title("vs restarts", fontsize=10)
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.set_ylim(max(-1.0, lo - pad), min(101.0, hi + pad))
    fig.tight_layout()
    return _png(fig)


def _histogram_png(report: "AuditReport") -> str | None:
    """Madry et al. 2018 (Fig. 1): are the final losses of PGD from random starts concentrated?

    Left: every start's final loss minus its example's median (pooled: the spread around each
    example's typical maximum). Right: the losses per example.
    """
    h = report.loss_histogram
    if not h or not h.get("losses"):
        return None
    import statistics

    rows = h["losses"]
    centred = [v - statistics.median(row) for row in rows for v in row]
    fig = _figure(9.0, 3.2)
    a1, a2 = fig.subplots(1, 2)
    a1.hist(centred, bins=30, color="C2", alpha=0.85)
    a1.set_xlabel("final loss − the example's median over starts")
    a1.set_ylabel("starts")
    a1.set_title("Concentration of the final losses", fontsize=10)
    for i, row in enumerate(rows):
        a2.plot([i] * len(row), row, "o", ms=3, alpha=0.6, color="C2")
        a2.plot([i - 0.3, i + 0.3], [statistics.median(row)] * 2, "-", color="k", lw=1)
    a2.set_xlabel("example")
    a2.set_ylabel("cross-entropy loss at the final iterate")
    a2.set_title(f"{len(rows)} examples × {h['starts']} random starts (PGD-{h['steps']}, no early stop)", fontsize=10)
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _grid_png(report: "AuditReport") -> str | None:
    if not report.examples:
        return None
    from .audit_report import decode_examples
    from .grid import save_grid

    ex = decode_examples(report.examples)
    if ex["x"].shape[1] not in (1, 3):
        return None
    with tempfile.TemporaryDirectory() as d:
        path = save_grid(Path(d) / "grid.png", ex["x"], ex["x_adv"], ex["y"], ex["clean_pred"], ex["adv_pred"],
                         ex["classes"], n=ex["x"].shape[0])
        data = path.read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _verdict_class(report: "AuditReport") -> str:
    warn = [c for c in report.checks if c.status == "warning" and c.view != "naive"]
    if "obfuscated" in report.verdict:
        return "v-bad"
    return "v-warn" if warn else "v-ok"


def _evidence(ev: dict[str, Any]) -> str:
    parts = []
    for k, v in ev.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (list, dict)):
            v = json.dumps(v)
            if len(v) > 160:
                v = v[:157] + "..."
        parts.append(f"{_e(k)}={_e(v)}")
    return ", ".join(parts)


def render_audit(report: "AuditReport") -> str:
    """The HTML page of `report` (a string; write it with ``AuditReport.save_html``)."""
    from .audit_report import format_threat

    r = report
    out: list[str] = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                      f"<title>Bastion audit — {_e(format_threat(r.threat))}</title>",
                      f"<style>{_CSS}</style></head><body>"]
    out.append("<h1>Bastion robustness audit</h1>")
    out.append(f'<p class="sub">{_e(format_threat(r.threat))} · {r.n} examples · budget {_e(r.budget)} · '
               f"{r.time_s:.1f} s</p>")
    out.append(f'<div class="verdict {_verdict_class(r)}" id="verdict">{_e(r.verdict)}</div>')

    out.append("<h2>Numbers</h2><table>")
    rows = [("clean accuracy", r.clean_accuracy)]
    if r.clean_accuracy_single_pass is not None:
        rows.append(("clean accuracy, one pass", r.clean_accuracy_single_pass))
    if r.detector_fpr is not None:
        rows.append(("detector false positives on clean inputs", r.detector_fpr))
    rows += [("naive suite (straight through the pipeline)", r.naive_accuracy),
             ("adaptive suite (built from the declarations)", r.adaptive_accuracy),
             ("worst case over every attack", r.robust_accuracy)]
    out += [f'<tr><th>{_e(k)}</th><td class="num">{_pct(v)}</td></tr>' for k, v in rows]
    out.append("</table>")
    out.append(f"<p class='ev'>{_e(r.adaptive.get('final_rule', ''))}</p>")

    out.append("<h2>How the defense was attacked</h2><ul class='choices'>")
    out += [f"<li>{_e(c)}</li>" for c in r.adaptive.get("choices", [])]
    out.append("</ul>")

    out.append("<h2>Checks</h2><table><tr><th>status</th><th>check</th><th>view</th><th>finding</th></tr>")
    for c in r.checks:
        out.append(f'<tr><td><span class="badge s-{_e(c.status)}">{_e(c.status)}</span></td><td>{_e(c.name)}</td>'
                   f"<td>{_e(c.view)}</td><td>{_e(c.message)}<div class='ev'>{_evidence(c.evidence)}</div></td></tr>")
    out.append("</table>")

    out.append("<h2>Attacks</h2><p class='ev'>Each attack runs on every correctly classified example of its scope "
               "(all examples, or the check subset); accuracy is after that attack alone, over its scope.</p>")
    out.append("<table><tr><th>attack</th><th>view</th><th>eps</th><th>scope</th><th>attacked</th><th>broken</th>"
               "<th>accuracy</th><th>time</th></tr>")
    for a in r.attacks:
        out.append(f"<tr><td>{_e(a['label'])}</td><td>{_e(a['view'])}</td><td class='num'>{a['eps']:.4g}</td>"
                   f"<td>{_e(a['scope'])}</td><td class='num'>{a['n_attacked']}</td>"
                   f"<td class='num'>{a['n_broken']}</td>"
                   f"<td class='num'>{_pct(a['accuracy'])}</td><td class='num'>{a['time_s']:.1f} s</td></tr>")
    out.append("</table>")

    out.append("<h2>Plots</h2>")
    for title, src in (("security curve", _curve_png(r)), ("convergence", _convergence_png(r)),
                       ("loss histogram", _histogram_png(r))):
        if src:
            out.append(f'<div><img alt="{_e(title)}" src="{src}"></div>')
    grid = _grid_png(r)
    if grid:
        out.append("<h2>Examples</h2><p class='ev'>Rows: original (label, clean prediction), adversarial "
                   "(its prediction), perturbation amplified to the full grey range. Broken examples first.</p>")
        out.append(f'<div><img alt="example grid" src="{grid}"></div>')

    if r.notes:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in r.notes) + "</ul>")
    out.append("<h2>Configuration</h2><details><summary>what was run</summary><pre>"
               + _e(json.dumps({"config": r.config, "declarations": r.adaptive.get("declarations"),
                                "detector": r.adaptive.get("detector")}, indent=2, sort_keys=True, default=str))
               + "</pre></details>")
    out.append("</body></html>")
    return "\n".join(out)
