"""Each ranker's cost on this machine: full-size random weights, K candidates per image.

    python -m benchmarks.rankers [--images 16] [--candidates 5]

Times `rank` on views already made (the decode step's output), after a warm-up call, in one
run: ms per image and the ratio to CLIP B/32. Writes `benchmarks/results/rankers.json`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.models import build_blip_itm_base, build_clip_b32, build_siglip_base
from captionflow.handlers.blip_itm import BlipItmRanker
from captionflow.handlers.clip import ClipRanker
from captionflow.handlers.siglip import SiglipRanker
from captionflow.views import ImageViews, make_view

RESULTS = Path(__file__).parent / "results" / "rankers.json"
RANKERS = {
    "clip": (build_clip_b32, ClipRanker, "openai/clip-vit-base-patch32"),
    "siglip": (build_siglip_base, SiglipRanker, "google/siglip-base-patch16-224"),
    "blip-itm": (build_blip_itm_base, BlipItmRanker, "Salesforce/blip-itm-base-coco"),
}


def captions(count: int, words: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(0, 5000, words)) for _ in range(count)]


def measure(name: str, work: Path, images: int, candidates: int) -> dict:
    build, ranker_class, checkpoint = RANKERS[name]
    ranker = ranker_class.from_pretrained(build(str(work / name)), device="cpu")
    spec = ranker.pixel_values.spec
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(images)]
    views = [ImageViews((640, 480), {spec: make_view(Image.fromarray(p), spec)}) for p in pictures]
    texts = [captions(candidates, 10, seed) for seed in range(images)]
    ranker.rank(views[:2], texts[:2])  # warm-up
    start = time.perf_counter()
    ranker.rank(views, texts)
    seconds = time.perf_counter() - start
    return {
        "ranker": name,
        "checkpoint_architecture": checkpoint,
        "images": images,
        "candidates": candidates,
        "ms_per_image": 1000 * seconds / images,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        rows = [measure(name, Path(work), args.images, args.candidates) for name in RANKERS]
    clip = rows[0]["ms_per_image"]
    for row in rows:
        row["vs_clip"] = row["ms_per_image"] / clip
        print(f"{row['ranker']:9} {row['ms_per_image']:8.1f} ms/image  {row['vs_clip']:5.2f}x CLIP")
    report = {"torch_threads": torch.get_num_threads(), "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
