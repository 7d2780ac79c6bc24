"""`OUT/report.html`: one self-contained page on a trained run, readable from disk or mail.

Contents: the test metrics, the training curves of `history.json` (a PNG drawn with
matplotlib's Agg canvas), and a gallery of test images (JPEG thumbnails made with PIL)
with the generated caption, its score and the references. Pictures are embedded as
base64 data URIs, so the file needs nothing beside it; all text is HTML-escaped.
An image that cannot be read shows a placeholder: a report is never lost to one bad file.
"""

import base64
import html
import io
from pathlib import Path, PurePosixPath

from pipeline.core import io_utils
from pipeline.core.run_files import REPORT_FILE

THUMBNAIL_SIZE = 160  # pixels, longest side
GALLERY_LIMIT = 48
# Metrics in the order the table shows them, with the label a reader knows them by.
METRIC_LABELS = (
    ("bleu_1", "BLEU-1"),
    ("bleu_2", "BLEU-2"),
    ("bleu_3", "BLEU-3"),
    ("bleu_4", "BLEU-4"),
    ("cider", "CIDEr-D"),
    ("meteor", "METEOR"),
    ("distinct_captions", "distinct captions / images"),
    ("shuffled_bleu_4", "BLEU-4 with other images' features (grounding control)"),
    ("bad_endings", "captions ending in a function word"),
    ("immediate_repeats", "captions with a word twice in a row"),
    ("mean_length", "mean caption length (words)"),
    ("vocabulary_used", "distinct words used"),
    ("n_images", "test images"),
    ("beam_size", "beam size"),
)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.5em; }
table.metrics { border-collapse: collapse; }
table.metrics td, table.metrics th { border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: left; }
table.metrics td.value { text-align: right; font-variant-numeric: tabular-nums; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 1em; }
figure { margin: 0; padding: 0.6em; border: 1px solid #ddd; border-radius: 4px; }
figure img, .placeholder { display: block; max-width: 160px; max-height: 160px; margin-bottom: 0.4em; }
.placeholder { width: 160px; height: 120px; background: #eee; color: #777; font-size: 0.8em;
  display: flex; align-items: center; justify-content: center; text-align: center; }
.caption { font-weight: 600; } .caption-xe { color: #555; font-size: 0.9em; } .score { color: #666; font-size: 0.85em; }
ul.references { margin: 0.3em 0 0 1.1em; padding: 0; font-size: 0.85em; color: #444; }
.note { color: #8a5300; }
"""


def thumbnail_data_uri(path, size=THUMBNAIL_SIZE):
    """A JPEG thumbnail of the image at `path` as a `data:image/jpeg;base64,...` string.

    Args:
        path: str or Path of any image PIL reads.
        size: int, the longest side in pixels (aspect ratio kept; never enlarged).
    Returns:
        str, or None when the file is missing or not a readable image.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError):
        # OSError covers missing files and PIL's UnidentifiedImageError (unreadable data).
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def training_curves_png(history):
    """PNG bytes of loss, accuracy and validation CIDEr-D per validation period, or None for an empty history.

    Args:
        history: list of dicts as in OUT/history.json ("step", "loss", "val_loss",
            "masked_accuracy", "val_masked_accuracy", "val_cider", "val_bleu_4"; missing
            keys are skipped). Histories of older runs, without "step", are drawn per "epoch".
    """
    if not history:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # A Figure with its own Agg canvas, not pyplot: no global state, no display needed.
    figure = Figure(figsize=(12, 3.4), dpi=100)
    FigureCanvasAgg(figure)
    by_step = all("step" in entry for entry in history)
    positions = [entry["step"] if by_step else entry["epoch"] for entry in history]
    panels = (
        ("loss", (("loss", "train"), ("val_loss", "val"))),
        ("accuracy (non-pad tokens)", (("masked_accuracy", "train"), ("val_masked_accuracy", "val"))),
        ("validation, greedy captions", (("val_cider", "CIDEr-D"), ("val_bleu_4", "BLEU-4"))),
    )
    for index, (title, series) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)
        for key, label in series:
            points = [(position, entry[key]) for position, entry in zip(positions, history) if key in entry]
            if points:
                axes.plot(*zip(*points), marker="o", markersize=3, label=label)
        if index == len(panels):
            # The periods whose model replaced decoder.keras (on the selected score).
            chosen = [(position, entry["val_cider"]) for position, entry in zip(positions, history)
                      if entry.get("best") and "val_cider" in entry]
            if chosen:
                axes.plot(*zip(*chosen), linestyle="none", marker="*", markersize=9, label="new best")
        axes.set_title(title)
        axes.set_xlabel("optimizer step" if by_step else "epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _format_value(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def render_report(title, metrics, captions, history, image_dir, max_images=GALLERY_LIMIT, notes=(),
                  compared_metrics=None, finetune_history=None, devices=()):
    """The report page as one HTML string.

    Args:
        title: str, the page heading.
        metrics: dict as in OUT/metrics.json.
        captions: list of dicts {"image_id", "caption", "score", "references": list[str]}.
        history: list of per-epoch dicts (OUT/history.json's "epochs").
        image_dir: str or Path the image ids are relative to.
        max_images: int, gallery size limit (the first `max_images` captions).
        notes: iterable of str shown under the metrics (e.g. a metric left out).
        compared_metrics: dict, the cross-entropy decoder's metrics after `finetune`: shown in
            a second column; captions then carry "caption_xe", shown beside "caption".
        finetune_history: list of per-epoch dicts of OUT/finetune_history.json, or None.
        devices: iterable of (stage, device line) str pairs, what each stage computed on
            ("features (extract)", "CPU, 2 cores, AVX512-BF16 (bf16)"); shown under the metrics.
    Returns:
        str, a complete HTML document.
    """
    escape = html.escape
    compared = compared_metrics or {}
    header = ("<th>fine-tuned (CIDEr-D)</th><th>cross-entropy</th>" if compared_metrics else "<th>value</th>")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        "<h2>Test metrics</h2>",
        f'<table class="metrics"><tr><th>metric</th>{header}</tr>',
    ]

    def row(label, key):
        cells = f'<td class="value">{escape(_format_value(metrics[key]))}</td>'
        if compared_metrics:
            other = compared.get(key)
            cells += f'<td class="value">{escape(_format_value(other)) if other is not None else ""}</td>'
        return f"<tr><td>{escape(label)}</td>{cells}</tr>"

    shown = set()
    for key, label in METRIC_LABELS:
        if key in metrics:
            shown.add(key)
            parts.append(row(label, key))
    for key in sorted(set(metrics) - shown):
        if isinstance(metrics[key], (int, float, str)):
            parts.append(row(key, key))
    parts.append("</table>")
    for note in notes:
        parts.append(f'<p class="note">{escape(note)}</p>')
    if devices:
        parts.append('<table class="metrics devices"><tr><th>computed by</th><th>device (precision)</th></tr>')
        parts.extend(f"<tr><td>{escape(stage)}</td><td>{escape(line)}</td></tr>" for stage, line in devices)
        parts.append("</table>")

    parts.append("<h2>Training curves</h2>")
    curves = training_curves_png(history)
    if curves is None:
        parts.append("<p>No training history was found.</p>")
    else:
        encoded = base64.b64encode(curves).decode("ascii")
        parts.append(f'<img alt="training curves" src="data:image/png;base64,{encoded}">')

    if finetune_history:
        parts.append("<h2>Self-critical fine-tuning</h2>")
        parts.append('<table class="metrics"><tr><th>epoch</th><th>mean reward (CIDEr-D of samples)</th>'
                     "<th>validation CIDEr-D</th><th>best</th></tr>")
        for entry in finetune_history:
            parts.append(
                f'<tr><td>{escape(str(entry.get("epoch")))}</td>'
                f'<td class="value">{escape(_format_value(entry.get("mean_reward")))}</td>'
                f'<td class="value">{escape(_format_value(entry.get("val_cider")))}</td>'
                f'<td>{"yes" if entry.get("best") else ""}</td></tr>'
            )
        parts.append("</table>")

    shown_captions = list(captions)[:max_images]
    parts.append(f"<h2>Test images ({len(shown_captions)} of {len(captions)})</h2>")
    parts.append('<div class="gallery">')
    for entry in shown_captions:
        image_id = entry["image_id"]
        path = Path(image_dir).joinpath(*PurePosixPath(image_id).parts)
        uri = thumbnail_data_uri(path)
        if uri is None:
            picture = f'<div class="placeholder">image unavailable<br>{escape(image_id)}</div>'
        else:
            picture = f'<img alt="{escape(image_id)}" src="{uri}">'
        references = "".join(f"<li>{escape(reference)}</li>" for reference in entry.get("references", []))
        parts.append(
            f"<figure>{picture}<figcaption>"
            f'<div class="image-id score">{escape(image_id)}</div>'
            f'<div class="caption">{escape(entry["caption"]) or "<em>(empty caption)</em>"}</div>'
            + (f'<div class="caption-xe">cross-entropy: {escape(entry["caption_xe"]) or "<em>(empty caption)</em>"}'
               "</div>" if "caption_xe" in entry else "")
            + f'<div class="score">score {escape(_format_value(float(entry["score"])))}</div>'
            f'<ul class="references">{references}</ul>'
            "</figcaption></figure>"
        )
    parts.append("</div></body></html>")
    return "\n".join(parts)


def write_report(out_dir, title, metrics, captions, history, image_dir, max_images=GALLERY_LIMIT, notes=(),
                 compared_metrics=None, finetune_history=None, devices=()):
    """Writes OUT/report.html atomically (see `render_report` for the arguments); returns its Path."""
    path = Path(out_dir) / REPORT_FILE
    io_utils.write_text(path, render_report(title, metrics, captions, history, image_dir, max_images, notes,
                                            compared_metrics, finetune_history, devices))
    return path
