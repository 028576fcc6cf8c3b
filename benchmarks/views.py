"""CPU cost per image of the models' image preprocessing: Hugging Face's processors against
captionflow's views.

    python -m benchmarks.views [--images 300] [--batch 8] [--rounds 5]

Both sides start from the same 640x480 photos as `captionflow.images.decode_image` gives them
(max side 768) and produce the same `pixel_values` for BLIP-base (384 squash) and CLIP-B/32
(shortest edge 224, centre crop 224): the processors' defaults are those checkpoints' configs.
Single-threaded (`torch.set_num_threads(1)`; Pillow and NumPy use one thread here anyway), CPU
time by `time.process_time`, so that other load on the machine does not count. `normalize`
runs on the CPU here; in the pipeline it runs on the GPU, and only `make_view` stays on the CPU.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import transformers
from PIL import Image
from transformers import BlipImageProcessorPil, CLIPImageProcessorPil

from benchmarks.bench import make_images
from captionflow.images import decode_image
from captionflow.views import ViewSpec, make_view, normalize, view_spec_from_processor


def decoded_photos(count: int) -> list[Image.Image]:
    with tempfile.TemporaryDirectory() as folder:
        paths = make_images(Path(folder), count, size=(640, 480))
        return [decode_image(Path(path).read_bytes(), max_side=768) for path in paths]


def ms_per_image(work: Callable[[Any], object], batches: Sequence[Any], images: int) -> float:
    """CPU milliseconds per image of `work` over all batches (after one untimed batch)."""
    work(batches[0])
    start = time.process_time()
    for batch in batches:
        work(batch)
    return (time.process_time() - start) * 1000 / images


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="median of this many runs")
    args = parser.parse_args()
    torch.set_num_threads(1)

    photos = decoded_photos(args.images)
    batches = [photos[i : i + args.batch] for i in range(0, len(photos), args.batch)]
    processors = {"BLIP": BlipImageProcessorPil(), "CLIP": CLIPImageProcessorPil()}
    specs = {model: view_spec_from_processor(p) for model, p in processors.items()}
    stacked = {  # the views of each batch, ready for normalize
        model: [torch.from_numpy(stack_views(batch, spec)) for batch in batches]
        for model, spec in specs.items()
    }

    def hf(model: str) -> Callable[[Any], object]:
        return lambda batch: processors[model](list(batch), return_tensors="pt")["pixel_values"]

    def views(model: str) -> Callable[[Any], object]:
        return lambda batch: stack_views(batch, specs[model])

    def normalized(model: str) -> Callable[[Any], object]:
        return lambda views: normalize(views, specs[model])

    steps = {
        "HF processor (PIL backend)": (hf, batches),
        "make_view, stacked (uint8, the CPU's part)": (views, batches),
        "normalize (float32; the GPU's part)": (normalized, None),
    }
    runs: dict[tuple[str, str], list[float]] = {(s, m): [] for s in steps for m in processors}
    for _ in range(args.rounds):  # interleaved, so that a slow spell of the machine hits all
        for (step, model), times in runs.items():
            make, inputs = steps[step]
            times.append(ms_per_image(make(model), inputs or stacked[model], len(photos)))
    ms = {key: statistics.median(times) for key, times in runs.items()}

    print(
        f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__} "
        f"(1 thread), transformers {transformers.__version__}, Pillow {PIL.__version__}; "
        f"{len(photos)} decoded {photos[0].width}x{photos[0].height} photos, batches of "
        f"{args.batch}, median of {args.rounds} runs; CPU ms per image"
    )
    print(f"| {'step':<42} | {'BLIP 384':>8} | {'CLIP 224':>8} | {'both':>6} |")
    print(f"|{'-' * 44}|{'-' * 10}|{'-' * 10}|{'-' * 8}|")
    both = {}
    for step in [*steps, "make_view + normalize"]:
        if step == "make_view + normalize":
            blip, clip = (sum(ms[s, m] for s in list(steps)[1:]) for m in processors)
        else:
            blip, clip = ms[step, "BLIP"], ms[step, "CLIP"]
        both[step] = blip + clip
        print(f"| {step:<42} | {blip:8.2f} | {clip:8.2f} | {blip + clip:6.2f} |")
    hf_ms, view_ms, _, full_ms = both.values()
    print(f"HF / (make_view + normalize): {hf_ms / full_ms:.1f}x")
    print(f"HF / make_view (the CPU's part once normalize runs on the GPU): {hf_ms / view_ms:.1f}x")


def stack_views(batch: Sequence[Image.Image], spec: ViewSpec) -> np.ndarray:
    return np.stack([make_view(image, spec) for image in batch])


if __name__ == "__main__":
    main()
