"""CPU cost per image of the models' image preprocessing: Hugging Face's processors against
captionflow's views; then of decoding, with and without drafting JPEGs to what the views need.

    python -m benchmarks.views [--images 300] [--batch 8] [--rounds 5] [--large 8]

Both sides start from the same 640x480 photos as `captionflow.images.decode_image` gives them
and produce the same `pixel_values` for BLIP-base (384 squash) and CLIP-B/32 (shortest edge
224, centre crop 224): the processors' defaults are those checkpoints' configs. `make_view`
resizes with torch's uint8 kernels; "Pillow's resize" is the same view made as the processors
(and `make_view` until now) make it. Single-threaded (`torch.set_num_threads(1)`; Pillow and
NumPy use one thread here anyway) except the row at torch's default thread count, CPU time by
`time.process_time`, so that other load on the machine does not count. `normalize` runs on the
CPU here; in the pipeline it runs on the GPU, and only `make_view` stays on the CPU.

The decode table times `decode_image` on photo-like JPEG bytes, alone and followed by both
views: as the pipeline did before (a picture drafted and shrunk to max side 768, then Pillow's
views) and does now (drafted to the smallest scale covering the views, `covering_size`, then
`make_views`), and, for a large JPEG, decoded whole.
"""

from __future__ import annotations

import argparse
import functools
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
from captionflow.views import (
    ViewSpec,
    covering_size,
    make_view,
    make_views,
    normalize,
    view_spec_from_processor,
)


def jpegs(count: int, size: tuple[int, int]) -> list[bytes]:
    with tempfile.TemporaryDirectory() as folder:
        return [Path(path).read_bytes() for path in make_images(Path(folder), count, size=size)]


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
    parser.add_argument("--large", type=int, default=8, help="3000x2000 JPEGs to decode")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)

    photos = [decode_image(data) for data in jpegs(args.images, (640, 480))]
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

    def pillow(model: str) -> Callable[[Any], object]:
        return lambda batch: np.stack([pillow_view(image, specs[model]) for image in batch])

    def threaded(model: str) -> Callable[[Any], object]:
        return lambda batch: with_threads(default_threads, stack_views, batch, specs[model])

    def normalized(model: str) -> Callable[[Any], object]:
        return lambda views: normalize(views, specs[model])

    steps = {
        "HF processor (PIL backend)": (hf, batches),
        "make_view, stacked (uint8, the CPU's part)": (views, batches),
        "normalize (float32; the GPU's part)": (normalized, None),
        "make_view with Pillow's resize (before)": (pillow, batches),
        f"make_view, torch at {default_threads} threads": (threaded, batches),
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
    order = [*list(steps)[:3], "make_view + normalize", *list(steps)[3:]]
    for step in order:
        if step == "make_view + normalize":
            blip, clip = (sum(ms[s, m] for s in list(steps)[1:3]) for m in processors)
        else:
            blip, clip = ms[step, "BLIP"], ms[step, "CLIP"]
        both[step] = blip + clip
        print(f"| {step:<42} | {blip:8.2f} | {clip:8.2f} | {blip + clip:6.2f} |")
    hf_ms, view_ms, _, full_ms, pillow_ms, _ = both.values()
    print(f"HF / (make_view + normalize): {hf_ms / full_ms:.1f}x")
    print(f"HF / make_view (the CPU's part once normalize runs on the GPU): {hf_ms / view_ms:.1f}x")
    print(f"Pillow's resize / torch's (make_view, both views): {pillow_ms / view_ms:.1f}x")
    print()
    decode_table(list(specs.values()), args)


Decode = Callable[[bytes], Image.Image]
Views = Callable[[Image.Image], object]


def decode_table(specs: list[ViewSpec], args: argparse.Namespace) -> None:
    """CPU ms per image of `decode_image`, alone and with both views: the pipeline before
    (pictures shrunk to 768, Pillow's views) and now (the covering draft, torch's views)."""
    cover = covering_size(specs)
    assert cover is not None

    def torch_views(image: Image.Image) -> object:
        return make_views(image, specs)

    def pillow_views(image: Image.Image) -> object:
        return [pillow_view(image, spec) for spec in specs]

    draft = functools.partial(decode_image, cover=cover)
    before = ("before: picture (max side 768), Pillow's views", decode_image, pillow_views)
    now = (f"now: draft covering {cover[0]}x{cover[1]}, torch's views", draft, torch_views)
    print(f"decode_image, CPU ms per image, median of {args.rounds} runs")
    print(f"| {'route':<50} | {'JPEG':>9} | {'decoded':>9} | {'decode':>6} | {'+ views':>7} |")
    print(f"|{'-' * 52}|{'-' * 11}|{'-' * 11}|{'-' * 8}|{'-' * 9}|")
    for (width, height), count in [((640, 480), 64), ((3000, 2000), args.large)]:
        whole = functools.partial(decode_image, cover=(height, width))
        routes = [before, now]
        if width > 640:
            routes.insert(0, ("whole (no draft), torch's views", whole, torch_views))
        datas = jpegs(count, (width, height))
        for route, decode, views in routes:
            alone, viewed = decode_ms(decode, views, datas, args.rounds)
            decoded = "x".join(map(str, decode(datas[0]).size))
            print(
                f"| {route:<50} | {f'{width}x{height}':>9} | {decoded:>9} | {alone:6.2f} "
                f"| {viewed:7.2f} |"
            )


def decode_ms(decode: Decode, views: Views, datas: list[bytes], rounds: int) -> tuple[float, float]:
    """Median CPU ms per image of `decode`, and of `decode` then `views` (interleaved)."""

    def viewed(data: bytes) -> object:
        return views(decode(data))

    alone: list[float] = []
    with_views: list[float] = []
    for _ in range(rounds):
        alone.append(ms_per_image(decode, datas, len(datas)))
        with_views.append(ms_per_image(viewed, datas, len(datas)))
    return statistics.median(alone), statistics.median(with_views)


def stack_views(batch: Sequence[Image.Image], spec: ViewSpec) -> np.ndarray:
    return np.stack([make_view(image, spec) for image in batch])


def pillow_view(image: Image.Image, spec: ViewSpec) -> np.ndarray:
    """The view as the processors' PIL backend makes it: Pillow's resize, then crop."""
    height, width = spec.resized_size(*image.size)
    if (width, height) != image.size:
        image = image.resize((width, height), spec.resample)
    if spec.center_crop:
        crop_height, crop_width = spec.size
        top, left = (height - crop_height) // 2, (width - crop_width) // 2
        image = image.crop((left, top, left + crop_width, top + crop_height))
    return np.asarray(image)


def with_threads(threads: int, work: Callable[..., Any], *args: Any) -> Any:
    """`work(*args)` with torch's intra-op threads at `threads`, then back to one."""
    torch.set_num_threads(threads)
    try:
        return work(*args)
    finally:
        torch.set_num_threads(1)


if __name__ == "__main__":
    main()
