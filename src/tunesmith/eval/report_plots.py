"""The report's charts, as data URIs ready for an <img>: training curves (SVG, read from a run's
metrics.jsonl) and the confusion heat map (PNG).

matplotlib is imported inside each function so `import tunesmith` stays fast and needs no display.
Labels are drawn with mathtext off: a label such as "$5_fee" is user text, not a formula.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from tunesmith.rundir import read_metrics

ANNOTATE_MAX_LABELS = 25  # above this many labels the heat map drops its per-cell numbers
CSS_DPI, PNG_DPI = 96, 192  # a figure inch is shown as 96 CSS pixels, drawn with 192 image pixels
PLOT_STYLE = {
    "text.parse_math": False,
    "svg.fonttype": "path",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.hashsalt": "tunesmith",
}


def read_training_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Train loss, validation loss and learning rate by step from a run's metrics.jsonl.

    Event lines (data summary, skipped steps) are not points. A torn last line, as a killed run leaves,
    is skipped rather than failing the whole report. A repeated step keeps its last value.
    """
    series: dict[str, dict[int, float]] = {"train": {}, "val": {}, "lr": {}}
    for record in read_metrics(path):
        if "event" in record or not isinstance(record.get("step"), int):
            continue
        for name, key in (("train", "loss"), ("val", "val_loss"), ("lr", "lr")):
            if isinstance(record.get(key), (int, float)):
                series[name][record["step"]] = float(record[key])
    return {name: sorted(points.items()) for name, points in series.items()}


def plot_training_curves(
    train: list[tuple[int, float]], val: list[tuple[int, float]], lr: list[tuple[int, float]]
) -> str:
    """Loss (train and validation) over steps and, beneath it on the same step axis, the learning rate:
    one SVG data URI, two stacked charts so a loss jump can be read against the schedule."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    with matplotlib.rc_context(PLOT_STYLE):
        panels = (["loss"] if train or val else []) + (["lr"] if lr else [])
        figure, axes = plt.subplots(
            len(panels),
            1,
            sharex=True,
            squeeze=False,
            figsize=(8, 0.4 + 2.8 * len(panels)),
            gridspec_kw={"height_ratios": [3 if p == "loss" else 1.1 for p in panels]},
        )
        for panel, ax in zip(panels, axes[:, 0]):
            if panel == "loss":
                if train:
                    ax.plot(*zip(*train), color="#4c78a8", linewidth=1.1, label="train loss")
                if val:
                    ax.plot(
                        *zip(*val), color="#e45756", linewidth=1.6, marker="o", markersize=3.5, label="validation loss"
                    )
                ax.set_ylabel("loss")
                ax.legend(frameon=False)
            else:
                ax.plot(*zip(*lr), color="#54a24b", linewidth=1.2)
                ax.set_ylabel("learning rate")
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        figure.align_ylabels(axes[:, 0])
        return svg_uri(figure)


def plot_confusion(labels: list[str], matrix: list[list[int]]) -> tuple[str, int]:
    """Heat map of the confusion matrix (rows expected, columns predicted): a PNG data URI and the
    width in CSS pixels to show it at (rendered at twice that, so it stays sharp on high-density screens).

    Colour is the share of each expected label's examples (row-normalised), so a rare label's errors
    show as clearly as a common one's; the numbers printed in the cells are raw counts.
    """
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot as plt
    from matplotlib.colors import ListedColormap

    counts = np.asarray(matrix, dtype=float)  # (labels, labels)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = len(labels)
    annotate = size <= ANNOTATE_MAX_LABELS
    cell = 0.42 if annotate else min(0.115, 12 / size)  # inches: 77 labels make an 8.9-inch grid
    side = max(size * cell, 3.5)
    tick_size = 8 if annotate else min(6.5, cell * 72 * 0.8)  # points; a label fits inside its row
    number_size = min(11.0, side / size * 72 * 0.3)  # points: 9 at 25 labels, 11 for a handful
    ticks = [label if len(label) <= 40 else label[:39] + "…" for label in labels]
    with matplotlib.rc_context(PLOT_STYLE):
        figure, axes = plt.subplots(figsize=(side, side))
        # Ten steps of 10%, starting at a visible blue so a rare confusion shows; empty cells stay white.
        colours = ListedColormap(matplotlib.colormaps["Blues"](np.linspace(0.18, 1, 10)))
        image = axes.imshow(
            np.ma.masked_equal(shares, 0), cmap=colours, vmin=0, vmax=1, interpolation="nearest", aspect="equal"
        )
        axes.set_xticks(range(size), ticks, rotation=90, fontsize=tick_size)
        axes.set_yticks(range(size), ticks, fontsize=tick_size)
        axes.set_xlabel("predicted")
        axes.set_ylabel("expected")
        axes.tick_params(length=2 if annotate else 1, pad=1.5)
        if annotate:
            for row, col in zip(*np.nonzero(counts)):
                colour = "white" if shares[row, col] > 0.6 else "#222222"
                axes.text(col, row, int(counts[row, col]), ha="center", va="center", fontsize=number_size, color=colour)
        else:  # faint grid lines so a reader can follow a row across 77 columns
            axes.set_xticks(np.arange(size + 1) - 0.5, minor=True)
            axes.set_yticks(np.arange(size + 1) - 0.5, minor=True)
            axes.grid(which="minor", color="#e6e6e6", linewidth=0.3)
            axes.tick_params(which="minor", length=0)
        for spine in axes.spines.values():
            spine.set_visible(False)
        colorbar = figure.colorbar(image, cax=axes.inset_axes((1.02, 0, 0.025 * 12 / max(side, 1), 1)))
        colorbar.set_label("share of expected label")
        return compact_png(figure)


def compact_png(figure: Any) -> tuple[str, int]:
    """A PNG data URI with a 64-colour palette, and its width in CSS pixels.

    The map has ten colours and the text's anti-aliasing a few hundred shades of grey, so keeping the 64
    most frequent colours exactly (rarer ones go to the nearest kept) loses nothing visible and takes a
    quarter of the size. Pillow's own quantisers average colours or map through a reduced-precision
    cache, which turns the white background grey.
    """
    import numpy as np
    from matplotlib import pyplot as plt
    from PIL import Image  # a dependency of matplotlib

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PNG_DPI, bbox_inches="tight")
    plt.close(figure)
    rgb = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.int64)  # (H, W, 3)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # (H, W) one int per colour
    colours, inverse, counts = np.unique(codes.ravel(), return_inverse=True, return_counts=True)
    unique_rgb = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=-1)  # (U, 3)
    kept_rgb = unique_rgb[np.argsort(-counts, kind="stable")[:64]]  # (K, 3)
    nearest = ((unique_rgb[:, None, :] - kept_rgb[None, :, :]) ** 2).sum(axis=-1).argmin(axis=1)  # (U,)
    picture = Image.fromarray(nearest[inverse].reshape(codes.shape).astype(np.uint8))
    picture.putpalette(kept_rgb.astype(np.uint8).ravel().tolist())
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    uri = f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"
    return uri, round(picture.width * CSS_DPI / PNG_DPI)


def svg_uri(figure: Any) -> str:
    """An SVG data URI; no creation date in it, so the same result renders to the same bytes. As an <img>
    rather than inline <svg>, two charts' element ids cannot collide."""
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(figure)
    return f"data:image/svg+xml;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def plot_reliability(bins: list[dict[str, Any]], edges: int) -> str:
    """The reliability diagram: each confidence bin's accuracy (bars over the bin) against the diagonal a calibrated
    model would follow, with the share of examples in each bin beneath; one SVG data URI."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    total = sum(b["count"] for b in bins) or 1
    with matplotlib.rc_context(PLOT_STYLE):
        figure, (top, bottom) = plt.subplots(
            2, 1, sharex=True, figsize=(4.2, 4.6), gridspec_kw={"height_ratios": [3, 1]}
        )
        width = 1 / edges
        lows = [b["low"] for b in bins]
        top.bar(lows, [b["accuracy"] for b in bins], width=width, align="edge", color="#4c78a8", label="accuracy")
        top.bar(
            lows,
            [b["confidence"] - b["accuracy"] for b in bins],
            bottom=[b["accuracy"] for b in bins],
            width=width,
            align="edge",
            color="#e45756",
            alpha=0.35,
            label="gap to mean confidence",
        )
        top.plot([0, 1], [0, 1], color="#444444", linewidth=0.8, linestyle="--", label="calibrated")
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        top.legend(loc="upper left", frameon=False, fontsize=8)
        bottom.bar(lows, [b["count"] / total for b in bins], width=width, align="edge", color="#888888")
        bottom.set_ylabel("share")
        bottom.set_xlabel("confidence (top label's probability)")
        bottom.set_xlim(0, 1)
        return svg_uri(figure)
