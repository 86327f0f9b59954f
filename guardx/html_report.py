"""``report.html``: one self-contained page (figures embedded as PNG data URIs, no scripts, no network)
that a person opens in a browser to see a pipeline run:

* the accuracy table (mean ± std over seeds) and the paired comparisons with their verdicts,
* robust accuracy against ε per method, teacher and student, with error bars over seeds,
* the distilled images of every method side by side (one image per class),
* the squeeze curves (loss, cross-entropy and regulariser per epoch),
* the stage timings and the environment the numbers came from.

The pipeline writes it at the end; ``guardx report RUN_DIR`` rebuilds it (and report.md/csv) from a
finished run's ``report.json`` and run folders.
"""
from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

from guardx.utils.io import read_json, write_text

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.better { background: #d9f2d9; } .worse { background: #f7d6d6; } .noise { background: #f2f2f2; }
img { max-width: 100%; border: 1px solid #eee; } .small { color: #666; font-size: 0.85em; }
"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _figure(rows: int, cols: int, width: float = 4.2, height: float = 3.2):
    from guardx.analysis.plots import new_figure

    return new_figure(rows, cols, width=width, height=height, squeeze=False)


# ---------------------------------------------------------------------------------------------- sections
def _paper_table(report: dict, cfg) -> str:
    """The paper's layout (methods as columns, attacks as rows per group) as HTML, when methods declare columns."""
    from guardx.report import paper_table

    md = paper_table(report, cfg)
    if not md:
        return ""
    rows = [r.strip("|").split("|") for r in md.splitlines() if not r.startswith("|---")]
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in rows[0])
    left = ' class="l"'
    body = "".join("<tr>" + "".join(f"<td{left if i < 2 else ''}>{html.escape(c.strip())}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows[1:])
    return f"<p>Students in the paper's layout (accuracy %):</p><table><tr>{head}</tr>{body}</table>"


def _tables(report: dict) -> str:
    names = report["metrics"]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in names)
    out = [f'<table><tr><th class="l">method</th><th class="l">model</th><th>seeds</th>{head}</tr>']
    for s in report.get("summary", []):
        cells = "".join(
            f"<td>{s['metrics'][m]['mean']:.2f}" + (f" ± {s['metrics'][m]['std']:.2f}" if len(s["seeds"]) > 1 else "")
            + "</td>" for m in names)
        out.append(f'<tr><td class="l">{html.escape(s["method"])}</td><td class="l">{html.escape(s["model"])}</td>'
                   f"<td>{len(s['seeds'])}</td>{cells}</tr>")
    out.append("</table>")
    if report.get("comparisons"):
        out.append("<p>Paired differences with each method's baseline "
                   "(accuracy points, same seeds; verdict from the 95% interval):</p>")
        out.append('<table><tr><th class="l">method − baseline</th><th class="l">model</th><th class="l">metric</th>'
                   '<th>difference</th><th>95% CI</th><th class="l">verdict</th><th class="l">interval from</th></tr>')
        for c in report["comparisons"]:
            css = {"better": "better", "worse": "worse"}.get(c["verdict"], "noise")
            ci = f"[{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}]" if c["ci"] else "n/a"
            out.append(f'<tr class="{css}"><td class="l">{html.escape(c["method"])} − {html.escape(c["baseline"])}</td>'
                       f'<td class="l">{html.escape(c["model"])}</td><td class="l">{html.escape(c["metric"])}</td>'
                       f"<td>{c['mean_diff']:+.2f}</td><td>{ci}</td><td class=\"l\">{c['verdict']}</td>"
                       f'<td class="l">{html.escape(c["interval"])}</td></tr>')
        out.append("</table>")
    return "\n".join(out)


_METRIC = re.compile(r"^(?P<attack>[a-z_]+\d*)@(?P<num>\d+(?:\.\d+)?)(?:/(?P<den>\d+))?$")


def _eps_curves(report: dict) -> dict[str, list[tuple[float, str]]]:
    """attack → [(ε, metric name)] for every bounded attack measured at some ε (clean is ε = 0)."""
    curves: dict[str, list[tuple[float, str]]] = {}
    for m in report["metrics"]:
        hit = _METRIC.match(m)
        if hit:
            eps = float(hit["num"]) / float(hit["den"] or 1)
            curves.setdefault(hit["attack"], []).append((eps, m))
    return {a: sorted(v) for a, v in curves.items()}


def _accuracy_vs_eps(report: dict) -> str:
    curves = _eps_curves(report)
    summary = report.get("summary", [])
    methods = list(dict.fromkeys(s["method"] for s in summary))
    if not curves or not methods:
        return "<p>No bounded attack was run.</p>"
    attack = max(curves, key=lambda a: len(curves[a]))  # the attack measured at the most radii
    points = [(0.0, "clean")] + curves[attack]
    fig, axes = _figure(1, len(methods))
    for ax, method in zip(axes[0], methods):
        for s in (s for s in summary if s["method"] == method):
            xs = [e * 255 for e, _ in points]
            ys = [s["metrics"][m]["mean"] for _, m in points]
            err = [s["metrics"][m]["std"] for _, m in points]
            ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=3, label=s["model"])
        ax.set(title=method, xlabel="ε × 255", ylabel=f"{attack} accuracy (%)", ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _img(_png(fig), f"{attack} accuracy against epsilon") + \
        f'<p class="small">{html.escape(attack)}; ε = 0 is clean accuracy; error bars: sample std over seeds.</p>'


def _first_run_dirs(report: dict) -> dict[str, Path]:
    """method → the run folder of its first seed (where its distilled set and squeeze metrics are)."""
    base = Path(report["config"]["run"]["out_dir"])
    out: dict[str, Path] = {}
    for r in report["rows"]:
        if r["method"] not in out:
            out[r["method"]] = Path(r["run_dir"]) if r.get("run_dir") else base / r["method"]
    return out


def _distilled_images(report: dict) -> str:
    import tempfile

    from guardx.analysis.grid import image_grid

    entries = [(m, d) for m, d in _first_run_dirs(report).items() if d.is_dir()]
    if not entries:
        return "<p>No distilled images found.</p>"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "grid.png"
            image_grid(entries, out, max_classes=10, per_class=1)
            uri = "data:image/png;base64," + base64.b64encode(out.read_bytes()).decode()
    except Exception as e:  # a report must still render when one run's images are missing
        return f"<p>Distilled images unavailable: {html.escape(str(e))}</p>"
    return _img(uri, "distilled images per method") + \
        '<p class="small">One image per class; rows are methods (first seed).</p>'


def _squeeze_curves(report: dict) -> str:
    histories = {}
    for method, run_dir in _first_run_dirs(report).items():
        path = run_dir / "squeeze" / "metrics.json"
        if path.is_file():
            hist = read_json(path).get("history") or []
            if hist:
                histories[method] = hist
    if not histories:
        return "<p>No squeeze curves (no method trained a teacher in this run).</p>"
    keys = [k for k in ("loss", "ce", "reg") if any(k in h for hist in histories.values() for h in hist)]
    fig, axes = _figure(1, len(keys))
    for ax, key in zip(axes[0], keys):
        for method, hist in histories.items():
            pts = [(h["epoch"], h[key]) for h in hist if key in h]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=method)
        ax.set(title=key, xlabel="epoch", yscale="log" if key == "reg" else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _img(_png(fig), "squeeze curves") + \
        '<p class="small">Per-epoch means of the squeeze objective (first seed); reg is on a log scale.</p>'


def _timings(report: dict) -> str:
    rows = "".join(f'<tr><td class="l">{html.escape(k)}</td><td>{v:.1f}</td></tr>'
                   for k, v in report.get("stage_seconds", {}).items())
    return (f'<table><tr><th class="l">method/stage</th><th>seconds</th></tr>{rows}'
            f"<tr><th class=\"l\">total</th><th>{report.get('total_seconds', 0):.0f}</th></tr></table>")


def _environment(report: dict) -> str:
    env = report.get("environment", {})
    keys = ("device_name", "torch", "cuda", "blas", "threads", "cpu_count", "deterministic", "git_revision",
            "timestamp_utc", "world_size")
    rows = "".join(f'<tr><td class="l">{k}</td><td class="l">{html.escape(str(env.get(k)))}</td></tr>'
                   for k in keys if k in env)
    return f"<table>{rows}</table>"


def render_html(report: dict, cfg) -> str:
    from guardx.report import settings_line

    seeds = ", ".join(map(str, report.get("seeds", [])))
    sections = [("Accuracy", _paper_table(report, cfg) + _tables(report)), ("Robust accuracy against ε", _accuracy_vs_eps(report)),
                ("Distilled images", _distilled_images(report)), ("Squeeze curves", _squeeze_curves(report)),
                ("Stage timings", _timings(report)), ("Environment", _environment(report))]
    body = "\n".join(f"<h2>{title}</h2>\n{content}" for title, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>guardx report</title>'
            f"<style>{_CSS}</style></head><body>\n<h1>guardx report</h1>\n"
            f'<p class="small">{html.escape(settings_line(cfg))} · seeds {html.escape(seeds)}</p>\n{body}\n'
            "</body></html>\n")


def write_html(report: dict, cfg, out: Path) -> Path:
    path = Path(out) / "report.html"
    write_text(render_html(report, cfg), path)
    return path
