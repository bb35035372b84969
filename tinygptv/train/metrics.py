"""Training metrics: a JSONL line per logged step and a loss / learning-rate curve PNG per stage.

The PNG is drawn with Pillow (a core dependency), so no plotting library is needed. Optional TensorBoard
logging when ``torch.utils.tensorboard`` (the ``tensorboard`` package) is importable and ``TINYGPTV_TB=1``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from PIL import Image, ImageDraw

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, out: Path, enabled: bool = True, resume: bool = False, step: int = 0):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.out = out
        self.tb = None
        if not enabled:
            return
        if resume and self.path.is_file():  # drop lines past the checkpoint we resume from
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
            self.path.write_text("".join(k + "\n" for k in kept))
        elif not resume:
            self.path.write_text("")
        self.fh = open(self.path, "a")
        if os.environ.get("TINYGPTV_TB") == "1":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                log.warning("TINYGPTV_TB=1 but tensorboard is not installed")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self, title: str) -> None:
        if not self.enabled:
            return
        self.fh.close()
        if self.tb is not None:
            self.tb.close()
        records = [json.loads(ln) for ln in self.path.read_text().splitlines() if ln]
        plot_curves(records, self.out / "loss_curve.png", title)


def plot_curves(records: list[dict], path: Path, title: str, size: tuple[int, int] = (900, 420)) -> None:
    """Loss (left axis, blue) and learning rate (right axis, orange) against step."""
    W, H = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 70, W - 80, 30, H - 40
    d.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    d.text((left, 8), f"{title}: loss (blue) and learning rate (orange) vs step", fill=(0, 0, 0))
    pts = [(r["step"], r["loss"], r["lr"]) for r in records if r.get("loss") is not None and math.isfinite(r["loss"])]
    if not pts:
        d.text((left + 10, top + 10), "no finite loss logged", fill=(200, 0, 0))
        img.save(path)
        return
    s0, s1 = min(p[0] for p in pts), max(p[0] for p in pts)
    s1 = s1 if s1 > s0 else s0 + 1

    def series(values: list[float], colour, axis_x: int, anchor: str) -> None:
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1e-12
        xy = [(left + (s - s0) / (s1 - s0) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))
              for (s, *_), v in zip(pts, values)]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        else:
            d.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=colour)
        d.text((axis_x, top - 2), f"{hi:.3g}", fill=colour, anchor=anchor)
        d.text((axis_x, bottom - 10), f"{lo:.3g}", fill=colour, anchor=anchor)

    series([p[1] for p in pts], (31, 119, 180), left - 6, "ra")
    series([p[2] for p in pts], (255, 127, 14), right + 6, "la")
    d.text((left, bottom + 8), str(s0), fill=(0, 0, 0))
    d.text((right, bottom + 8), str(max(p[0] for p in pts)), fill=(0, 0, 0), anchor="ra")
    img.save(path)
