"""What the benchmark scripts share: where the real archive lies, and a generated stand-in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# The real Imagenette-160 images, beside a checkout (../shared/datasets); absent on most machines.
SHARED_ARCHIVE = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "imagenette2-160.tgz"


def generated_folder(root: Path, *, classes: int = 10, train: int, val: int, size: int = 160) -> Path:
    """An image folder of random-noise JPEGs (train/<class>/, val/<class>/): timing only, no learning."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.JPEG")
    return root
