"""Can the pipeline feed the models? CPU per image outside the models' arithmetic, per phase,
and the pipeline's rate against the models' own (the engine fed ready batches in memory).

    python -m benchmarks.feed                      # CPU: about 13 minutes here
    python -m benchmarks.feed --device cuda        # on a GPU box (see benchmarks/gpu.sh)

1. **CPU per image**: models with real input sizes (BLIP 384 px, CLIP 224 px) but next to no
   arithmetic, on 640x480 JPEGs. Each phase is priced alone, single-threaded (read, decode,
   views, stack and cross to the engine, model call, write); then the whole pipeline, in worker
   processes with a shared engine, as the CPU seconds of every process (the CLI, its workers,
   the engine) per image, between N and 2N images so that start-up cancels out.
2. **Engine bare**: the models fed ready uint8 batches already in memory: their own rate.
3. **Pipeline / engine bare** with several worker processes, on models with real compute
   (BLIP-base and CLIP-B/32 architectures, random weights, `--layers` deep): is the engine kept
   busy?
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import subprocess
import sys
import tempfile
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Every caption exactly this many tokens: random weights sample end-of-text at random, and a
# benchmark must compare the same work (the longest captions: an upper bound on the cost).
TOKENS = 30


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def per_image_ms(work, items: list, repeat: int = 1) -> float:
    """CPU milliseconds per item of `work(item)`, this process (all its threads)."""
    work(items[0])
    started = time.process_time()
    for _ in range(repeat):
        for item in items:
            work(item)
    return (time.process_time() - started) / (len(items) * repeat) * 1000


def phases(blip: str, clip: str, uris: list[str], batch: int, device: str) -> dict[str, float]:
    """Each phase's CPU ms per image, measured alone on the same images."""
    import torch

    from captionflow.engine import EngineSpec
    from captionflow.files import open_image_file
    from captionflow.handlers import BlipCaptionHandler, ClipRankHandler, DecodingOptions
    from captionflow.images import DEFAULT_MAX_BYTES, decode_image
    from captionflow.records import CaptionRecord
    from captionflow.transforms.write import imagefolder_row
    from captionflow.views import ViewBatch, make_views

    torch.set_num_threads(1)
    captioner = BlipCaptionHandler(
        blip, decoding=DecodingOptions(min_new_tokens=TOKENS, max_new_tokens=TOKENS), device=device
    )
    ranker = ClipRankHandler(clip, device=device)
    specs = [captioner.view_spec(), ranker.view_spec()]
    blobs = [Path(uri).read_bytes() for uri in uris]

    def read(uri: str) -> None:
        with open_image_file(uri, DEFAULT_MAX_BYTES) as file:
            file.read()

    def decode(blob: bytes) -> None:
        import io

        decode_image(io.BytesIO(blob), name="x")

    import io

    pictures = [decode_image(io.BytesIO(blob), name="x") for blob in blobs]
    views = [make_views(picture, specs) for picture in pictures]
    batches = [views[i : i + batch] for i in range(0, len(views) - batch + 1, batch)]

    def cross(group: list) -> None:  # stack, and the pickling of both ends of the crossing
        pickle.loads(ForkingPickler.dumps(ViewBatch.stack(group)))

    engine = EngineSpec(captioner, ranker, max_batch_size=batch, rank_batch_size=batch).load()
    stacked = [ViewBatch.stack(group) for group in batches]
    results = engine.caption_and_rank(stacked[0])
    best = results[0][0]
    record = CaptionRecord("/data/x.jpg", best.text, best.score, tuple(results[0]), "b", "c")
    return {
        "read": per_image_ms(read, uris),
        "decode": per_image_ms(decode, blobs),
        "views": per_image_ms(lambda p: make_views(p, specs), pictures),
        "stack + cross": per_image_ms(cross, batches) / batch,
        "model call": per_image_ms(engine.caption_and_rank, stacked) / batch,
        "write": per_image_ms(imagefolder_row("/data"), [record] * 200),
    }


def engine_bare(
    blip: str,
    clip: str,
    uris: list[str],
    batch: int,
    device: str,
    seconds: float = 20,
    threads: int = 0,
) -> dict:
    """The models' own rate: the engine fed ready uint8 batches already in memory (on a GPU,
    its copy there included), timed for at least `seconds` after a warm-up batch, with torch
    at `threads` threads (0: as many as the pipeline's engine gets, one per core)."""
    import io

    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)

    from captionflow.engine import EngineSpec
    from captionflow.handlers import BlipCaptionHandler, ClipRankHandler, DecodingOptions
    from captionflow.images import decode_image
    from captionflow.views import ViewBatch, make_views

    captioner = BlipCaptionHandler(
        blip, decoding=DecodingOptions(min_new_tokens=TOKENS, max_new_tokens=TOKENS), device=device
    )
    ranker = ClipRankHandler(clip, device=device)
    specs = [captioner.view_spec(), ranker.view_spec()]
    views = [
        make_views(decode_image(io.BytesIO(Path(u).read_bytes()), name=u), specs)
        for u in uris[:batch]
    ]
    stacked = ViewBatch.stack(views)
    engine = EngineSpec(captioner, ranker, max_batch_size=batch, rank_batch_size=batch).load()
    engine.caption_and_rank(stacked)  # warm-up
    rounds, started, cpu = 0, time.perf_counter(), time.process_time()
    while rounds < 2 or time.perf_counter() - started < seconds:
        engine.caption_and_rank(stacked)
        rounds += 1
    elapsed = time.perf_counter() - started
    return {
        "images_per_s": rounds * batch / elapsed,
        "cpu_ms_per_image": (time.process_time() - cpu) / (rounds * batch) * 1000,
    }


def pipeline(
    blip: str, clip: str, list_file: str, out: str, args: argparse.Namespace, threads: int = 0
) -> dict:
    """The CLI in a fresh process: wall seconds and CPU seconds of it and all its children.
    `threads`: torch's threads in every process (0: torch's default)."""
    argv = [
        sys.executable, "-m", "captionflow", "run", "--input", list_file, "--output", out,
        "--captioner", f"blip:{blip}", "--ranker", f"clip:{clip}",
        "--caption-batch-size", str(args.request), "--engine-batch-size", str(args.batch),
        "--rank-batch-size", str(args.batch), "--engine", "shared", "--device", args.device,
        "--checkpoint-every", "1000", "--attempts", "1",
        "--min-new-tokens", str(TOKENS), "--max-new-tokens", str(TOKENS),
        "--direct_num_workers", str(args.workers), "--direct_running_mode", "multi_processing",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cpu, started = children_cpu(), time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - started, children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"pipeline failed:\n{done.stderr[-3000:]}")
    return {"seconds": wall, "cpu_seconds": cpu}


def marginal(
    blip: str, clip: str, uris: list[str], work: Path, n: int, args, threads: int = 0
) -> dict:
    """Pipeline runs at n and 2n images; the difference prices n images without start-up."""
    runs = {}
    for count in (n, 2 * n):
        listing = work / f"list-{count}.txt"
        listing.write_text("\n".join(uris[:count]) + "\n")
        out = str(work / f"out-{count}")
        runs[count] = pipeline(blip, clip, str(listing), out, args, threads)
    extra = {key: runs[2 * n][key] - runs[n][key] for key in ("seconds", "cpu_seconds")}
    return {
        "runs": runs,
        "images_per_s": n / extra["seconds"],
        "cpu_ms_per_image": extra["cpu_seconds"] / n * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="N (runs at N and 2N)")
    parser.add_argument("--workers", type=int, default=2, help="local worker processes")
    parser.add_argument("--request", type=int, default=32, help="images per worker request")
    parser.add_argument("--batch", type=int, default=128, help="engine batch (merged)")
    parser.add_argument("--layers", type=int, default=1, help="depth of the real-compute models")
    parser.add_argument("--compute-images", type=int, default=48, help="N for part 3")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads for part 3 (0: one per core)"
    )
    parser.add_argument(
        "--parts", default="feed,compute", help="feed (parts 1 and 2), compute (part 3)"
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "feed.json"))
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    from benchmarks.bench import make_images
    from benchmarks.models import build_blip_base, build_clip_b32
    from captionflow.tiny_models import build_tiny_blip, build_tiny_clip

    work = Path(tempfile.mkdtemp(prefix="captionflow-feed-"))
    uris = make_images(work / "images", 2 * args.images)
    blip = build_tiny_blip(str(work / "feed-blip"), image_size=384)
    clip = build_tiny_clip(str(work / "feed-clip"), image_size=224)
    result: dict = {"machine": machine(args.device), "settings": vars(args)}

    if "feed" in args.parts:
        feed(blip, clip, uris, work, args, result)
    if "compute" in args.parts:
        big_blip = build_blip_base(str(work / "blip-base"), layers=args.layers)
        big_clip = build_clip_b32(str(work / "clip-b32"), layers=args.layers)
        batch = args.batch if args.device != "cpu" else 8
        threads = args.threads
        result["compute_bare"] = engine_bare(
            big_blip, big_clip, uris, batch, args.device, threads=threads
        )
        compute_args = argparse.Namespace(**{**vars(args), "request": 8, "batch": batch})
        result["compute_pipeline"] = marginal(
            big_blip, big_clip, uris, work, args.compute_images, compute_args, threads
        )
        # again after: this shared machine's speed drifts over minutes; the mean is used
        after = engine_bare(big_blip, big_clip, uris, batch, args.device, threads=threads)
        result["compute_bare_after"] = after
        result["compute_bare_mean"] = (
            result["compute_bare"]["images_per_s"] + after["images_per_s"]
        ) / 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    report(result)


def feed(blip: str, clip: str, uris: list[str], work: Path, args, result: dict) -> None:
    result["phases_ms"] = phases(blip, clip, uris[:256], args.batch, args.device)
    result["negligible_bare"] = engine_bare(blip, clip, uris, args.batch, args.device, threads=1)
    # With next to no arithmetic, the engine's CPU work is what it is on a GPU (launching the
    # models' steps): single-threaded, as a GPU engine runs; idle OpenMP threads spinning on
    # these tiny tensors would only add CPU that no GPU deployment pays.
    result["negligible_pipeline"] = marginal(blip, clip, uris, work, args.images, args, 1)
    report(result)


def machine(device: str) -> dict:
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
    }


def report(result: dict) -> None:
    if "phases_ms" in result:
        report_feed(result)
    if "compute_pipeline" in result:
        bare, piped = result["compute_bare_mean"], result["compute_pipeline"]
        print(
            f"real compute: engine bare {bare:.3f} images/s (mean of before and after), "
            f"pipeline {piped['images_per_s']:.3f} images/s: pipeline / engine bare = "
            f"{piped['images_per_s'] / bare:.2f}"
        )


def report_feed(result: dict) -> None:
    phases_ms = result["phases_ms"]
    print("\nCPU ms per image, each phase alone (single thread):")
    for name, value in phases_ms.items():
        print(f"  {name:<14} {value:7.2f}")
    print(f"  {'sum':<14} {sum(phases_ms.values()):7.2f}")
    bare, piped = result["negligible_bare"], result["negligible_pipeline"]
    print(
        f"whole pipeline ({result['settings']['workers']} workers + shared engine): "
        f"{piped['cpu_ms_per_image']:.2f} CPU ms per image, all processes "
        f"({piped['images_per_s']:.1f} images/s; bare engine {bare['images_per_s']:.0f} "
        f"images/s at {bare['cpu_ms_per_image']:.2f} CPU ms per image)"
    )


if __name__ == "__main__":
    main()
