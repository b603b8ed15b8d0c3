"""report.html: one self-contained page rendered from an eval result (docs/eval-json.md).

Everything is inline (CSS, charts as data URIs), so the file opens offline and can be mailed as is.
Each section appears only when the result holds its data. All user text (labels, inputs, predictions,
paths) goes through `esc`: evaluation data is untrusted and may contain markup.
"""

from __future__ import annotations

import datetime
import html
import json
import math
from pathlib import Path
from typing import Any

from tunesmith.eval.metrics import is_share
from tunesmith.eval.report_plots import ANNOTATE_MAX_LABELS, read_training_curves

LOWER_IS_BETTER = {"mse", "mae", "rmse", "loss", "perplexity", "rating_mae"}  # a fall in these is an improvement
MAX_ROWS = 50  # rows per example table; eval.json holds them all
MAX_TEXT = 400  # characters of an input shown before it is cut

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d232b;margin:0;background:#f6f7f9}
main{max-width:1280px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:0 0 12px}h3{font-size:14px;margin:18px 0 8px}
section{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:16px 20px;margin:16px 0}
nav a{margin-right:14px;color:#2b5fb4;text-decoration:none;font-size:13px}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:10px 0 0;font-size:13px}
dl.meta dt{color:#5b6470}dl.meta dd{margin:0;word-break:break-all}
table{border-collapse:collapse;font-size:13px;margin:4px 0}
th,td{padding:4px 10px;border-bottom:1px solid #eceef1;text-align:left;vertical-align:top}
th{background:#f3f5f7;font-weight:600;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td div.text{min-width:200px;max-width:440px;white-space:pre-wrap;overflow-wrap:break-word}
td div.label{max-width:380px;white-space:pre-wrap;overflow-wrap:break-word}
tr.better td.diff{background:#e3f4e6;color:#14632b}tr.worse td.diff{background:#fbe5e5;color:#9b1c1c}
td.bar{min-width:100px;background-repeat:no-repeat;background-size:calc(var(--w) / 2) 55%;
background-position:left center;background-image:linear-gradient(#cfe0f5,#cfe0f5)}
.note{color:#5b6470;font-size:12.5px;margin:6px 0}
img.chart{max-width:100%;height:auto;display:block}
.wrap{overflow-x:auto;max-width:100%}
.scroll{max-height:560px;overflow:auto;border:1px solid #eceef1;border-radius:4px;display:inline-block}
.scroll th{position:sticky;top:0}
"""


def write_report(result: dict[str, Any], output: Path, metrics_jsonl: Path | None = None) -> Path:
    """Render `result` (an eval.json document) to the HTML file `output`; returns `output`.

    `metrics_jsonl` is a training run's metrics.jsonl: when given, the report opens with its loss and
    learning-rate curves.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    curves = read_training_curves(Path(metrics_jsonl)) if metrics_jsonl is not None else None
    output.write_text(render_report(result, curves), encoding="utf-8")
    return output


def render_report(result: dict[str, Any], curves: dict[str, list] | None = None) -> str:
    """The page as a string; `curves` is `read_training_curves`'s answer."""
    sections = [
        (title, anchor, body) for title, anchor, build in SECTIONS if (body := build(result, curves)) is not None
    ]
    nav = "".join(f'<a href="#{anchor}">{title}</a>' for title, anchor, _ in sections)
    content = "".join(f'<section id="{anchor}"><h2>{title}</h2>{body}</section>' for title, anchor, body in sections)
    title = f"tunesmith eval: {esc(result.get('target', ''))}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>'
        f"<body><main>{header(result)}<nav>{nav}</nav>{content}</main></body></html>\n"
    )


def header(result: dict[str, Any]) -> str:
    date = result.get("date") or datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    rows = [
        ("target", result.get("target")),
        ("task", result.get("task")),
        ("data", result.get("data")),
        ("examples", result.get("n")),
        ("date", date),
    ]
    settings = result.get("settings") or {}
    if settings:
        rows.append(("settings", " · ".join(f"{key}={plain(value)}" for key, value in settings.items())))
    if result.get("timing"):
        rows.append(
            (
                "time",
                " · ".join(
                    f"{key.removesuffix('_s')} {value:.1f} s" if isinstance(value, (int, float)) else f"{key} {value}"
                    for key, value in result["timing"].items()
                ),
            )
        )
    items = "".join(f"<dt>{name}</dt><dd>{esc(value)}</dd>" for name, value in rows if value is not None)
    return f'<header><h1>Evaluation report</h1><dl class="meta">{items}</dl></header>'


# --- sections: each returns its HTML body, or None when the result has nothing for it ------------------


def curves_section(result: dict[str, Any], curves: dict[str, list] | None) -> str | None:
    if not curves or not any(curves.values()):
        return None
    from tunesmith.eval.report_plots import plot_training_curves

    parts = [
        image(
            plot_training_curves(curves["train"], curves["val"], curves["lr"]),
            "train and validation loss and learning rate by step",
        )
    ]
    if curves["val"]:
        step, best = min(curves["val"], key=lambda point: point[1])
        parts.append(f'<p class="note">Best validation loss {best:.4g} at step {step}.</p>')
    return "".join(parts)


def metrics_section(result: dict[str, Any], _: Any) -> str | None:
    if not result.get("metrics"):
        return None
    systems = [("target", result["metrics"])]
    systems += [(name, block.get("metrics") or {}) for name, block in (result.get("baselines") or {}).items()]
    names = list(dict.fromkeys(metric for _, metrics in systems for metric in metrics))
    rows = []
    for name in names:
        cells = [metrics.get(name) or {} for _, metrics in systems]
        percent = is_percent(name, [cell.get("value") for cell in cells])
        n = next((cell["n"] for cell in cells if cell.get("n") is not None), None)
        if cells[0].get("unparsed"):  # regression: predictions with no number in them, left out of n
            n = f"{n} ({cells[0]['unparsed']} unparsed)"
        values = "".join(f'<td class="num">{interval(c.get("value"), c.get("ci95"), percent)}</td>' for c in cells)
        rows.append(f'<tr><td>{esc(name)}</td>{values}<td class="num">{esc(n)}</td></tr>')
    headers = ["metric", *(esc(name) for name, _ in systems), "n"]
    note = '<p class="note">Value and its 95% bootstrap interval over examples.</p>'
    return table(headers, rows) + note


def comparison_section(result: dict[str, Any], _: Any) -> str | None:
    if not result.get("comparisons"):
        return None
    target_metrics = result.get("metrics") or {}
    with_p = any("mcnemar_p" in comparison for comparison in result["comparisons"].values())
    rows = [
        row
        for baseline, comparison in result["comparisons"].items()
        for row in comparison_rows(baseline, comparison, target_metrics, with_p)
    ]
    note = (
        "Target minus baseline on the same examples, with a 95% paired bootstrap interval (pp = percentage "
        "points). Green: the interval excludes 0 and the target is better; red: it excludes 0 and the target "
        "is worse."
    )
    if with_p:
        note += " McNemar's p tests whether the two disagree on which examples they get right; one per baseline."
    headers = ["baseline", "metric", "difference [95% CI]", *(["McNemar p"] if with_p else [])]
    return table(headers, rows) + f'<p class="note">{note}</p>'


def comparison_rows(
    baseline: str, comparison: dict[str, Any], target_metrics: dict[str, Any], with_p: bool
) -> list[str]:
    """One row per metric; the baseline's name and its McNemar p span all of its rows."""
    entries = [(name, entry) for name, entry in comparison.items() if isinstance(entry, dict) and "diff" in entry]
    rows = []
    for position, (name, entry) in enumerate(entries):
        diff = entry.get("diff")
        percent = is_percent(name, [(target_metrics.get(name) or {}).get("value"), abs(diff or 0)])
        cells = f'<td>{esc(name)}</td><td class="num diff">{interval(diff, entry.get("ci95"), percent, True)}</td>'
        if position == 0:
            span = f' rowspan="{len(entries)}"'
            p_cell = f'<td class="num"{span}>{format_p(comparison.get("mcnemar_p"))}</td>' if with_p else ""
            cells = f"<td{span}>{esc(baseline)}</td>{cells}{p_cell}"
        rows.append(f'<tr class="{verdict(name, entry)}">{cells}</tr>')
    return rows


def verdict(name: str, entry: dict[str, Any]) -> str:
    """'better' / 'worse' when the interval excludes 0, else ''. For losses and errors lower is better."""
    ci95 = entry.get("ci95")
    if not (isinstance(ci95, (list, tuple)) and len(ci95) == 2 and all(isinstance(v, (int, float)) for v in ci95)):
        return ""
    if ci95[0] <= 0 <= ci95[1]:
        return ""
    return "better" if (ci95[0] > 0) != (name in LOWER_IS_BETTER) else "worse"


def confusion_section(result: dict[str, Any], _: Any) -> str | None:
    confusion = result.get("confusion") or {}
    labels, matrix = confusion.get("labels"), confusion.get("matrix")
    if not labels or not matrix:
        return None
    from tunesmith.eval.report_plots import plot_confusion

    chart, width = plot_confusion([str(label) for label in labels], matrix)
    body = image(chart, "confusion matrix heat map", width)
    note = "Rows are the expected label, columns the prediction; colour is the share of the row's examples."
    if len(labels) > ANNOTATE_MAX_LABELS:
        top = (result.get("errors") or {}).get("top_confusions")
        note += f" With {len(labels)} labels the counts are left out of the cells; the largest confusions follow."
        return body + f'<p class="note">{note}</p>' + (confusions_table(top) if top else "")
    return body + f'<p class="note">{note} Numbers are counts.</p>'


def confusions_table(confusions: list[dict[str, Any]]) -> str:
    rows = [
        f"<tr><td>{esc(c.get('expected'))}</td><td>{esc(c.get('predicted'))}</td>"
        f'<td class="num">{esc(c.get("count"))}</td></tr>'
        for c in confusions[:MAX_ROWS]
    ]
    return table(["expected", "predicted", "count"], rows) + shown_of(confusions)


def calibration_section(result: dict[str, Any], _: Any) -> str | None:
    """A classifier's calibration: its temperature and threshold, ECE and NLL (and with a threshold, coverage and
    selective accuracy; with an out-of-scope label, in-scope accuracy and out-of-scope recall), and the
    reliability diagram."""
    section = result.get("calibration")
    if not section:
        return None
    from tunesmith.eval.report_plots import plot_reliability

    names = ["ece", "nll", "coverage", "selective_accuracy", "in_scope_accuracy", "out_of_scope_recall"]
    rows = [
        f'<tr><td>{esc(name)}</td><td class="num">'
        f"{interval(section[name]['value'], section[name]['ci95'], is_percent(name, [section[name]['value']]))}"
        f'</td><td class="num">{esc(section[name].get("n"))}</td></tr>'
        for name in names
        if section.get(name)
    ]
    threshold = section.get("threshold")
    note = (
        f'<p class="note">Probabilities are softmax(logits / {section["temperature"]:.3f}), the temperature fitted '
        "on the validation set. "
        + (
            f"Below confidence {threshold:.3f} the classifier abstains (coverage: the share it answers). "
            if threshold is not None
            else "It never abstains. "
        )
        + f"ECE over {section['bins']} equal-width confidence bins; 95% bootstrap intervals.</p>"
    )
    chart = image(plot_reliability(section["reliability"], section["bins"]), "reliability diagram", 420)
    return table(["metric", "value", "n"], rows) + note + chart


def per_label_section(result: dict[str, Any], _: Any) -> str | None:
    per_label = result.get("per_label")
    if not per_label:
        return None
    ordered = sorted(per_label.items(), key=lambda item: (item[1].get("f1") or 0, -(item[1].get("support") or 0)))
    rows = []
    for label, scores in ordered:
        bounds = scores.get("ci95") or {}
        cells = "".join(
            f'<td class="num">{interval(scores.get(key), bounds.get(key), True)}</td>'
            for key in ("precision", "recall")
        )
        f1 = scores.get("f1")
        bar = f' style="--w:{f1 * 100:.0f}%"' if isinstance(f1, (int, float)) else ""
        rows.append(
            f'<tr><td>{esc(label)}</td>{cells}<td class="num bar"{bar}>{interval(f1, bounds.get("f1"), True)}</td>'
            f'<td class="num">{esc(scores.get("support"))}</td></tr>'
        )
    note = (
        '<p class="note">In percent with 95% bootstrap intervals, weakest F1 first; support is the number of '
        "examples expected to have the label.</p>"
    )
    return note + table(["label", "precision", "recall", "F1", "support"], rows, scroll=len(rows) > 25)


def errors_section(result: dict[str, Any], _: Any) -> str | None:
    errors = result.get("errors") or {}
    parts = []
    many_labels = len((result.get("confusion") or {}).get("labels") or []) > ANNOTATE_MAX_LABELS
    if errors.get("top_confusions") and not many_labels:  # with many labels it sits under the heat map
        parts.append("<h3>Top confusions</h3>" + confusions_table(errors["top_confusions"]))
    if errors.get("worst"):
        worst = errors["worst"]
        scored = any(row.get("score") is not None for row in worst)
        rows = [
            f'<tr><td class="num">{esc(row.get("index"))}</td>{text_cell(row.get("input"), "text")}'
            f"{text_cell(row.get('expected'))}{text_cell(row.get('predicted'))}"
            + (f'<td class="num">{number(row.get("score"), False)}</td>' if scored else "")
            + "</tr>"
            for row in worst[:MAX_ROWS]
        ]
        headers = ["#", "input", "expected", "predicted", *(["score"] if scored else [])]
        parts.append("<h3>Worst examples</h3>" + table(headers, rows) + shown_of(worst))
    if errors.get("regressions"):
        regressions = errors["regressions"]
        rows = [
            f'<tr><td class="num">{esc(row.get("index"))}</td>{text_cell(row.get("input"), "text")}'
            f"{text_cell(row.get('expected'))}{text_cell(row.get('predicted'))}<td>{esc(row.get('baseline'))}</td>"
            f"{text_cell(row.get('baseline_predicted'))}</tr>"
            for row in regressions[:MAX_ROWS]
        ]
        headers = ["#", "input", "expected", "target predicted", "baseline", "baseline predicted"]
        parts.append(
            "<h3>Regressions: target wrong, baseline right</h3>" + table(headers, rows) + shown_of(regressions)
        )
    return "".join(parts) or None


def slices_section(result: dict[str, Any], _: Any) -> str | None:
    per_slice = (result.get("errors") or {}).get("per_slice")
    if not per_slice:
        return None
    names = list(dict.fromkeys(metric for metrics in per_slice.values() for metric in metrics))
    rows = []
    for slice_value, metrics in per_slice.items():
        cells = [metrics.get(name) or {} for name in names]
        n = next((cell["n"] for cell in cells if cell.get("n") is not None), None)
        values = "".join(
            f'<td class="num">{interval(c.get("value"), c.get("ci95"), is_percent(name, [c.get("value")]))}</td>'
            for name, c in zip(names, cells)
        )
        rows.append(f'<tr><td>{esc(slice_value)}</td>{values}<td class="num">{esc(n)}</td></tr>')
    return table(["slice", *(esc(name) for name in names), "n"], rows)


def examples_section(result: dict[str, Any], _: Any) -> str | None:
    """Side by side outputs: for generation, where people read them beside any text metric, and for any result
    without metrics, where they are the whole evidence."""
    examples = result.get("examples")
    if (result.get("metrics") and result.get("task") != "generation") or not examples:
        return None
    baselines = list(dict.fromkeys(name for row in examples for name in (row.get("baselines") or {})))
    rows = [
        f'<tr><td class="num">{esc(row.get("index"))}</td>{text_cell(row.get("input"), "text")}'
        f"{text_cell(row.get('expected'))}{text_cell(row.get('predicted'))}"
        + "".join(text_cell(((row.get("baselines") or {}).get(name) or {}).get("predicted")) for name in baselines)
        + "</tr>"
        for row in examples[:MAX_ROWS]
    ]
    headers = ["#", "input", "expected", "target", *(esc(name) for name in baselines)]
    return table(headers, rows) + shown_of(examples)


SECTIONS = [
    ("Training curves", "curves", curves_section),
    ("Metrics", "metrics", metrics_section),
    ("Comparison with baselines", "comparison", comparison_section),
    ("Calibration", "calibration", calibration_section),
    ("Confusion matrix", "confusion", confusion_section),
    ("Per-label scores", "per-label", per_label_section),
    ("Error analysis", "errors", errors_section),
    ("Per-slice metrics", "slices", slices_section),
    ("Examples", "examples", examples_section),
]


# --- formatting -------------------------------------------------------------------------------------------


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def is_percent(name: str, values: list[Any]) -> bool:
    """Shares of examples (in [0, 1]) read as percentages; amounts (errors, losses, rewards) do not."""
    numbers = [v for v in values if isinstance(v, (int, float))]
    return is_share(name) and all(0 <= v <= 1 for v in numbers)


def number(value: Any, percent: bool, signed: bool = False, decimals: int | None = None) -> str:
    """A percentage with one decimal, or a plain number with `decimals` (default: three significant digits)."""
    if not isinstance(value, (int, float)):
        return "—"
    if not math.isfinite(value):
        return str(value)  # inf, nan: a diverged perplexity should say so
    sign = "+" if signed else ""
    if percent:
        return f"{value * 100:{sign}.1f}"
    return f"{value:{sign}.{decimals if decimals is not None else decimals_for([value])}f}"


def decimals_for(values: list[Any]) -> int:
    """Decimals that give the largest of `values` three significant digits: 2.31, 10.1, 0.0123, 1235."""
    largest = max((abs(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)), default=0)
    return min(max(2 - math.floor(math.log10(largest)), 0), 6) if largest else 2


def interval(value: Any, ci95: Any, percent: bool, signed: bool = False) -> str:
    """'55.5% [49.9, 61.0]' or '2.31 [2.20, 2.43]'; a difference reads '+5.2 pp [+1.0, +9.4]'."""
    bounds = list(ci95) if isinstance(ci95, (list, tuple)) and len(ci95) == 2 else []
    decimals = decimals_for([value, *bounds])  # one precision for a value and its interval
    unit = (" pp" if signed else "%") if percent else ""
    text = number(value, percent, signed, decimals) + (unit if isinstance(value, (int, float)) else "")
    if bounds:
        text += f" [{number(bounds[0], percent, signed, decimals)}, {number(bounds[1], percent, signed, decimals)}]"
    return text


def format_p(p: Any) -> str:
    """McNemar p: '3.2e-05' when small, '0.041' otherwise."""
    if not isinstance(p, (int, float)):
        return "—"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.2g}"


def image(uri: str, alt: str, width: int | None = None) -> str:
    size = f' style="width:min(100%,{width}px)"' if width else ""
    return f'<img class="chart" src="{uri}" alt="{alt}"{size}>'


def table(headers: list[str], rows: list[str], scroll: bool = False) -> str:
    """A table from escaped header texts and ready-made <tr> rows."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    return f'<div class="wrap{" scroll" if scroll else ""}">{body}</div>'


def text_cell(value: Any, kind: str = "label") -> str:
    """A cell of user text, escaped and cut at MAX_TEXT; kind "text" (an input) gets the wider column."""
    text = "" if value is None else str(value)
    if len(text) > MAX_TEXT:
        text = f"{text[:MAX_TEXT]}… (+{len(text) - MAX_TEXT} characters)"
    return f'<td><div class="{kind}">{esc(text)}</div></td>'


def shown_of(rows: list[Any]) -> str:
    return (
        f'<p class="note">Showing {MAX_ROWS} of {len(rows)}; eval.json holds them all.</p>'
        if len(rows) > MAX_ROWS
        else ""
    )
