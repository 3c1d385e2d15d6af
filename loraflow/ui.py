"""What a run shows on its Prefect flow-run page (the Artifacts tab):

- `loraflow-train-progress`: a progress artifact the train task updates as it goes;
- `loraflow-stages`: the run report as a table (state, computed, reused, seconds, key per task);
- `loraflow-weights`: a link to the trained weights;
- `loraflow-loss-curve` and `loraflow-samples`: a loss-curve chart and a grid of the samples
  (prompts down, checkpoints across, captioned).

The two pictures are PNGs stored beside the run's report (`reports/<flow run id>/`). Prefect's
image artifact takes a URL the browser can fetch: on an object store that is a presigned URL
(valid 7 days); a local store has none a browser could open, so the PNG is embedded in a markdown
artifact as a data URL instead.
"""

from __future__ import annotations

import base64
import io
import time

from PIL import Image, ImageDraw, ImageFont
from prefect.artifacts import (create_image_artifact, create_link_artifact, create_markdown_artifact,
                               create_progress_artifact, create_table_artifact, update_progress_artifact)

from loraflow.manifests import Samples, Weights
from loraflow.report import Report
from loraflow.store import Store

PRESIGNED_S = 7 * 24 * 3600  # the longest S3 allows
CELL = 160  # side of a sample in the grid, pixels
CAPTION = 14  # caption line height


class TrainProgress:
    """The train task's progress artifact: created at the first update, then updated at most once
    a second (each update is an API call) and always at the end."""

    def __init__(self, total: int, every_s: float = 1.0):
        self.total, self.every_s = total, every_s
        self.artifact_id = None
        self.last = 0.0

    def __call__(self, step: int) -> None:
        percent = 100.0 * step / self.total
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(progress=percent, key="loraflow-train-progress",
                                                        description=f"train: step {step} of {self.total}")
        elif step == self.total or time.monotonic() - self.last >= self.every_s:
            update_progress_artifact(self.artifact_id, progress=percent,
                                     description=f"train: step {step} of {self.total}")
        else:
            return
        self.last = time.monotonic()


def publish(report: Report, weights: Weights, samples: Samples | None, store: Store) -> None:
    """Create the run's artifacts (called by the flow when the report is stored)."""
    create_table_artifact(key="loraflow-stages", description="loraflow: each task's cache state and work",
                          table=[{"task": label, "state": state, "computed": computed, "reused": reused,
                                  "seconds": round(seconds, 2), "key": key}
                                 for label, state, computed, reused, seconds, key in report.stages()])
    create_link_artifact(key="loraflow-weights", link=link(store, weights.final.path),
                         link_text=f"{report.method} weights, step {weights.final_step}",
                         description=f"stored at {report.weights}")
    rows = store.read_json(weights.metrics) if weights.metrics else []
    if rows:
        picture(store, report, "loss-curve", loss_curve(rows), f"training loss over {len(rows)} steps")
    if samples and samples.images:
        cells = [(s.prompt, s.step, Image.open(io.BytesIO(store.read(s.image)))) for s in samples.images]
        picture(store, report, "samples", sample_grid(cells), "samples: prompts down, checkpoints across")


def link(store: Store, rel: str) -> str:
    """A URL a browser can open: presigned on an object store, else the store's own URL."""
    try:
        return store.fs.sign(store.abs(rel), expiration=PRESIGNED_S)
    except NotImplementedError:  # a local (or other unsignable) filesystem
        url = store.url_of(rel)
        return url if "://" in url else f"file://{url}"


def picture(store: Store, report: Report, name: str, png: bytes, description: str) -> None:
    rel = f"reports/{report.flow_run_id}/{name}.png"
    store.write_atomic(rel, png)
    url = link(store, rel)
    key = f"loraflow-{name}"
    if url.startswith(("http://", "https://")):
        create_image_artifact(image_url=url, key=key, description=description)
    else:
        data = base64.b64encode(png).decode()
        create_markdown_artifact(key=key, description=description,
                                 markdown=f"![{name}](data:image/png;base64,{data})\n\n`{store.url_of(rel)}`")


def loss_curve(rows: list[dict], width: int = 640, height: int = 320) -> bytes:
    """Each step's loss (light) and its running mean over ~5% of the run (dark), with axes labelled."""
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
              for i in range(len(losses))]
    left, right, top, bottom = 56, 12, 12, 32
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1e-6
    first, last = steps[0], max(steps[-1], steps[0] + 1)

    def xy(step: float, loss: float) -> tuple[float, float]:
        x = left + (step - first) / (last - first) * (width - left - right)
        return x, top + (hi - loss) / (hi - lo) * (height - top - bottom)

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.rectangle([left, top, width - right, height - bottom], outline="#888888")
    for value in (lo, (lo + hi) / 2, hi):
        _, y = xy(first, value)
        draw.text((4, y - 6), f"{value:.3g}", fill="black", font=font)
    for step in (first, (first + last) // 2, last):
        x, _ = xy(step, lo)
        draw.text((x - 10, height - bottom + 6), str(step), fill="black", font=font)
    draw.text((width // 2 - 40, height - 14), "step  (loss)", fill="black", font=font)
    if len(rows) > 1:
        draw.line([xy(s, v) for s, v in zip(steps, losses)], fill="#9ecae1", width=1)
        draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill="#08519c", width=2)
    else:
        x, y = xy(steps[0], losses[0])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="#08519c")
    return _png(image)


def sample_grid(cells: list[tuple[str, int, Image.Image]]) -> bytes:
    """One row per prompt, one column per checkpoint step (the first sample of each pair), each
    captioned with its prompt and step."""
    prompts = list(dict.fromkeys(p for p, _, _ in cells))
    steps = sorted({s for _, s, _ in cells})
    first = {}
    for prompt, step, image in cells:
        first.setdefault((prompt, step), image)
    font = ImageFont.load_default()
    grid = Image.new("RGB", (CELL * len(steps), (CELL + 2 * CAPTION) * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for row, prompt in enumerate(prompts):
        for col, step in enumerate(steps):
            x, y = col * CELL, row * (CELL + 2 * CAPTION)
            if (prompt, step) in first:
                image = first[(prompt, step)].convert("RGB")
                image.thumbnail((CELL, CELL), Image.Resampling.NEAREST if image.width < CELL else Image.Resampling.LANCZOS)
                if image.width < CELL:  # the tiny models' 32 px samples: scaled up, pixels kept sharp
                    image = image.resize((CELL, CELL * image.height // image.width), Image.Resampling.NEAREST)
                grid.paste(image, (x, y))
            draw.text((x + 2, y + CELL + 1), prompt[:26], fill="black", font=font)
            draw.text((x + 2, y + CELL + CAPTION), f"step {step}", fill="#555555", font=font)
    return _png(grid)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
