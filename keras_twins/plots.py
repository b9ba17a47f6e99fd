"""Training curves as a PNG drawn with Pillow (no plotting library needed)."""

import math

from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from keras_twins.files import replacing

TRAIN_COLOR = (31, 119, 180)
VALIDATION_COLOR = (255, 127, 14)
PANEL = (560, 400)
MARGIN = dict(left=70, right=20, top=40, bottom=50)


def plot_history(history, path):
    """Loss and accuracy per epoch, train and validation, side by side.

    Args:
        history: column -> values, as `keras.callbacks.History.history` or
            `history.csv` read by `keras_twins.training.read_history`.
        path: the PNG to write (replaced whole).
    """
    epochs = [int(e) + 1 for e in history.get("epoch", [])] or list(
        range(1, len(history.get("loss", [])) + 1))
    image = Image.new("RGB", (2 * PANEL[0], PANEL[1]), "white")
    draw = ImageDraw.Draw(image)
    for index, (metric, title) in enumerate((("loss", "loss"), ("accuracy", "top-1 accuracy"))):
        series = [(label, history.get(key, []), color) for label, key, color in (
            ("train", metric, TRAIN_COLOR), ("validation", f"val_{metric}", VALIDATION_COLOR))]
        _panel(draw, index * PANEL[0], title, epochs, series,
               fixed=(0.0, 1.0) if metric == "accuracy" else None)
    with replacing(path) as temporary:
        image.save(temporary, format="PNG")


def _panel(draw, x0, title, epochs, series, fixed=None):
    font = _font(14)
    left, top = x0 + MARGIN["left"], MARGIN["top"]
    right, bottom = x0 + PANEL[0] - MARGIN["right"], PANEL[1] - MARGIN["bottom"]
    values = [v for _, ys, _ in series for v in ys if math.isfinite(v)]
    low, high = fixed or ((min(values), max(values)) if values else (0.0, 1.0))
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    first, last = (epochs[0], epochs[-1]) if epochs else (1, 1)
    span = max(1, last - first)

    def point(epoch, value):
        return (left + (epoch - first) / span * (right - left),
                bottom - (value - low) / (high - low) * (bottom - top))

    draw.text((x0 + PANEL[0] / 2, 12), title, fill="black", font=_font(16), anchor="mt")
    for i in range(5):  # horizontal grid with value labels
        value = low + (high - low) * i / 4
        y = point(first, value)[1]
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((left - 6, y), f"{value:.3g}", fill="black", font=font, anchor="rm")
    for epoch in _ticks(first, last):
        x = point(epoch, low)[0]
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x, bottom + 6), str(epoch), fill="black", font=font, anchor="mt")
    draw.text(((left + right) / 2, PANEL[1] - 14), "epoch", fill="black", font=font,
              anchor="mb")
    draw.rectangle([left, top, right, bottom], outline="black")
    # Loss falls and accuracy rises: the legend goes where the curves end up not.
    legend_y = top + 12 if fixed is None else bottom - 12 - 18 * (len(series) - 1)
    draw.rectangle([right - 128, legend_y - 10, right - 6, legend_y + 18 * len(series) - 8],
                   fill="white", outline=(200, 200, 200))
    for label, ys, color in series:
        points = [point(e, v) for e, v in zip(epochs, ys) if math.isfinite(v)]
        if not points:
            continue
        if len(points) > 1:
            draw.line(points, fill=color, width=3)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.line([(right - 120, legend_y), (right - 95, legend_y)], fill=color, width=3)
        draw.text((right - 88, legend_y), label, fill="black", font=font, anchor="lm")
        legend_y += 18


def _ticks(first, last, most=10):
    step = max(1, math.ceil((last - first + 1) / most))
    return range(first, last + 1, step)


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()
