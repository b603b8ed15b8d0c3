"""report.html: one self-contained page rendered from an eval.json result.

A realistic classification result (4 labels, one baseline, markup in the data) must render every section,
with intervals, escaped user text and inline charts only; results without a section's data (perplexity,
generation) must render without it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tunesmith.eval.report import write_report
from tunesmith.eval.report_plots import read_training_curves

LABELS = ["card_arrival", "card_linking", "exchange_rate", "top_up_failed"]
XSS = "<script>alert(1)</script> where is my card?"


def metric(value: float, low: float, high: float, n: int = 40) -> dict:
    return {"value": value, "ci95": [low, high], "n": n}


def classification_result() -> dict:
    per_label = {
        "card_arrival": {"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 10},
        "card_linking": {"precision": 0.5, "recall": 0.4, "f1": 0.444, "support": 10},
        "exchange_rate": {"precision": 1.0, "recall": 0.9, "f1": 0.947, "support": 10},
        "top_up_failed": {"precision": 0.6, "recall": 0.6, "f1": 0.6, "support": 10},
    }
    return {
        "target": "runs/banking-lora",
        "task": "classification",
        "data": "/data/test.jsonl",
        "n": 40,
        "settings": {"resamples": 1000, "seed": 0, "method": "constrained"},
        "metrics": {"accuracy": metric(0.675, 0.525, 0.8), "macro_f1": metric(0.698, 0.54, 0.81)},
        "per_label": per_label,
        "confusion": {"labels": LABELS, "matrix": [[8, 2, 0, 0], [5, 4, 0, 1], [0, 0, 9, 1], [1, 2, 1, 6]]},
        "baselines": {"base": {"metrics": {"accuracy": metric(0.25, 0.125, 0.4), "macro_f1": metric(0.2, 0.1, 0.33)}}},
        "comparisons": {
            "base": {
                "accuracy": {"diff": 0.425, "ci95": [0.25, 0.6]},
                "macro_f1": {"diff": 0.04, "ci95": [-0.05, 0.12]},
                "mcnemar_p": 3.2e-05,
            }
        },
        "errors": {
            "top_confusions": [{"expected": "card_linking", "predicted": "card_arrival", "count": 5}],
            "per_slice": {
                "mobile": {"accuracy": metric(0.7, 0.5, 0.85, 20)},
                "web": {"accuracy": metric(0.65, 0.45, 0.8, 20)},
            },
            "worst": [{"index": 7, "input": XSS, "expected": "card_arrival", "predicted": "card_linking"}],
            "regressions": [
                {
                    "index": 12,
                    "input": "top up failed again",
                    "expected": "top_up_failed",
                    "predicted": "card_linking",
                    "baseline": "base",
                    "baseline_predicted": "top_up_failed",
                }
            ],
        },
        "timing": {"target_s": 4.2, "base_s": 6.1},
    }


def write_metrics_jsonl(path: Path) -> Path:
    lines = [
        {"step": 0, "event": "data", "examples": 100},
        *({"step": step, "loss": 3.0 / step, "lr": 1e-4, "tokens_per_s": 900.0} for step in range(1, 11)),
        {"step": 5, "val_loss": 1.1, "best_val_loss": 1.1},
        {"step": 10, "val_loss": 0.9, "best_val_loss": 0.9},
        {"step": 11, "event": "skipped", "reason": "non-finite loss or gradient", "loss": 99.0},
    ]
    # a killed run leaves a torn last line
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 12, "lo', encoding="utf-8")
    return path


def section(page: str, anchor: str) -> str:
    match = re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.DOTALL)
    assert match, f"section {anchor} missing"
    return match.group(1)


def test_classification_report_has_every_section_self_contained_and_escaped(tmp_path):
    output = write_report(
        classification_result(), tmp_path / "out" / "report.html", write_metrics_jsonl(tmp_path / "metrics.jsonl")
    )
    assert output == tmp_path / "out" / "report.html" and output.is_file()
    page = output.read_text(encoding="utf-8")

    # one document, nothing fetched: no links, no remote sources, no scripts of any kind
    assert page.count("<html") == 1 and page.count("</html>") == 1
    assert 'src="http' not in page and "<link" not in page and "<script" not in page and "@import" not in page
    for heading in (
        "Training curves",
        "Metrics",
        "Comparison with baselines",
        "Confusion matrix",
        "Per-label scores",
        "Error analysis",
        "Worst examples",
        "Regressions",
        "Top confusions",
        "Per-slice metrics",
    ):
        assert heading in page, heading
    for header_text in ("runs/banking-lora", "classification", "/data/test.jsonl", "resamples=1000", "target 4.2 s"):
        assert header_text in page

    metrics = section(page, "metrics")
    assert "67.5% [52.5, 80.0]" in metrics and "25.0% [12.5, 40.0]" in metrics and ">40<" in metrics
    comparison = section(page, "comparison")
    assert "+42.5 pp [+25.0, +60.0]" in comparison and "3.2e-05" in comparison
    assert re.search(r'<tr class="better">.*?accuracy', comparison)  # the interval excludes 0
    assert re.search(r'<tr class="">.*?macro_f1', comparison)  # this one does not
    assert "70.0% [50.0, 85.0]" in section(page, "slices")

    assert "&lt;script&gt;alert(1)&lt;/script&gt; where is my card?" in section(page, "errors")
    assert section(page, "curves").count('src="data:image/svg+xml;base64,') == 1
    assert "Best validation loss 0.9 at step 10" in section(page, "curves")
    assert section(page, "confusion").count('src="data:image/png;base64,') == 1


def test_per_label_table_lists_weakest_f1_first(tmp_path):
    page = write_report(classification_result(), tmp_path / "report.html").read_text(encoding="utf-8")
    per_label = section(page, "per-label")
    positions = [
        per_label.index(f"<td>{label}</td>")
        for label in ("card_linking", "top_up_failed", "card_arrival", "exchange_rate")
    ]
    assert positions == sorted(positions)
    assert "44.4" in per_label and "Training curves" not in page  # no metrics.jsonl given, no curves


def test_perplexity_result_renders_plain_numbers_and_only_its_sections(tmp_path):
    result = {
        "target": "gpt2",
        "task": "perplexity",
        "data": "/data/held_out.jsonl",
        "n": 120,
        "metrics": {"loss": metric(2.31, 2.2, 2.43, 120), "perplexity": metric(10.07, 9.02, 11.36, 120)},
        "baselines": {"base": {"metrics": {"loss": metric(2.6, 2.48, 2.71, 120)}}},
        "comparisons": {"base": {"loss": {"diff": -0.29, "ci95": [-0.35, -0.22]}}},
    }
    page = write_report(result, tmp_path / "report.html").read_text(encoding="utf-8")
    cells = re.findall(r'<td class="num">([^<]*)</td>', section(page, "metrics"))
    assert cells == ["2.31 [2.20, 2.43]", "2.60 [2.48, 2.71]", "120", "10.1 [9.0, 11.4]", "—", "120"]
    # a lower loss is an improvement, and without McNemar there is no p column
    assert re.search(r'<tr class="better">.*?-0.290 \[-0.350, -0.220\]', section(page, "comparison"))
    assert "McNemar" not in page
    for absent in ("Confusion matrix", "Per-label scores", "Error analysis", "Training curves", "<img"):
        assert absent not in page


def test_many_labels_drop_cell_numbers_and_show_top_confusions_under_the_heat_map(tmp_path):
    labels = [f"intent_{i:02d}" for i in range(40)]
    matrix = [[5 if i == j else int(j == (i + 1) % 40) for j in range(40)] for i in range(40)]
    result = {
        "target": "run",
        "task": "classification",
        "n": 240,
        "metrics": {"accuracy": metric(0.83, 0.78, 0.87, 240)},
        "per_label": {label: {"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 6} for label in labels},
        "confusion": {"labels": labels, "matrix": matrix},
        "errors": {"top_confusions": [{"expected": "intent_03", "predicted": "intent_04", "count": 1}]},
    }
    page = write_report(result, tmp_path / "report.html").read_text(encoding="utf-8")
    confusion = section(page, "confusion")
    assert "left out of the cells" in confusion and "<td>intent_04</td>" in confusion
    assert "Top confusions" not in page  # shown once, under the heat map
    assert 'class="wrap scroll"' in section(page, "per-label")


def test_generation_result_shows_examples_side_by_side_escaped(tmp_path):
    result = {
        "target": "run",
        "task": "generation",
        "n": 1,
        "examples": [
            {
                "index": 0,
                "input": "<b>hi</b>",
                "expected": None,
                "predicted": "x" * 1000,
                "baselines": {"base": {"predicted": "<img src=x onerror=alert(1)>"}},
            }
        ],
    }
    page = write_report(result, tmp_path / "report.html").read_text(encoding="utf-8")
    examples = section(page, "examples")
    assert "&lt;b&gt;hi&lt;/b&gt;" in examples and "&lt;img src=x onerror=alert(1)&gt;" in examples
    assert "<img" not in page and "(+600 characters)" in examples


def test_training_curves_skip_events_torn_lines_and_missing_values(tmp_path):
    path = write_metrics_jsonl(tmp_path / "metrics.jsonl")
    with path.open("a", encoding="utf-8") as handle:
        handle.write('\n{"step": 13, "loss": null, "lr": 1e-5}\n')
    curves = read_training_curves(path)
    assert [step for step, _ in curves["train"]] == list(range(1, 11))  # not the skipped step's 99.0
    assert curves["val"] == [(5, 1.1), (10, 0.9)]
    assert curves["lr"][-1] == (13, 1e-5)


def test_importing_the_report_does_not_import_matplotlib():
    code = (
        "import sys, tunesmith.eval.report; assert not {'matplotlib', 'sacrebleu', 'rouge_score'} & "
        "set(sys.modules), 'plots and text metrics load on first use'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def header_of(page: str) -> str:
    return page.split("<nav>")[0]


def test_the_header_shows_only_the_settings_that_shaped_the_task(tmp_path):
    """A perplexity report names no decoding or label settings; a classification report names its method and labels."""
    from tunesmith.data.formats import convert_classification, convert_text
    from tunesmith.eval.evaluate import EvalOptions, assemble
    from tunesmith.registry import tasks

    perplexity = tasks.get("perplexity")
    items = perplexity.items([convert_text({"text": "a b"}), convert_text({"text": "c"})])
    predictions = {"target": [(-3.0, 2), (-1.0, 1)], "base": [(-4.0, 2), (-2.0, 1)]}
    options = EvalOptions(task="perplexity", baselines=("base",), resamples=20)
    result = assemble("model", tmp_path / "held_out.jsonl", options, perplexity, items, predictions, [], {})
    header = header_of(write_report(result, tmp_path / "perplexity.html").read_text(encoding="utf-8"))
    assert "resamples=20" in header and "baselines=[&quot;base&quot;]" in header
    for unrelated in ("method=", "labels=", "max_new_tokens=", "rubric=", "judge"):
        assert unrelated not in header, unrelated

    classification = tasks.get("classification")
    items = classification.items([convert_classification({"text": "t", "label": label}) for label in ("a", "b")])
    result = assemble(
        "model",
        tmp_path / "intents.jsonl",
        EvalOptions(resamples=20),
        classification,
        items,
        {"target": ["a", "a"]},
        ["a", "b"],
        {},
    )
    header = header_of(write_report(result, tmp_path / "classification.html").read_text(encoding="utf-8"))
    assert "method=constrained" in header and "labels=2" in header and "max_new_tokens=" not in header


def test_scored_generation_shows_its_text_metrics_and_the_replies_side_by_side(tmp_path):
    result = {
        "target": "run",
        "task": "generation",
        "n": 1,
        "metrics": {"rouge_l": metric(0.41, 0.3, 0.5, 1), "chrf": metric(38.2, 30.1, 45.0, 1)},
        "examples": [{"index": 0, "input": "say hi", "expected": "hi there", "predicted": "hello"}],
    }
    page = write_report(result, tmp_path / "report.html").read_text(encoding="utf-8")
    cells = re.findall(r'<td class="num">([^<]*)</td>', section(page, "metrics"))
    assert "41.0% [30.0, 50.0]" in cells and "38.2 [30.1, 45.0]" in cells, "ROUGE-L a share, chrF on its 0-100 scale"
    assert "hi there" in section(page, "examples")
