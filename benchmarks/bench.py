"""captionflow benchmark: is the pipeline as fast as the bare models, and how much faster than the
original design? All figures come from one run, on the same models and decoding settings.

    python -m benchmarks.bench --quick          # reduced depth, few images: a smoke run (CPU)
    python -m benchmarks.bench                  # full-size BLIP-base and CLIP-B/32
    python -m benchmarks.bench --device cuda    # on a GPU, with a batch-size sweep

Models are the real architectures with random weights (honest compute, no download); with
--layers N every transformer stack has N layers instead of 12. Each pipeline run is a fresh
process, so that its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def make_images(folder: Path, count: int, size: tuple[int, int] = (640, 480)) -> list[str]:
    """Photo-like JPEGs (smooth gradients plus noise), so that decoding costs what it does."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    paths = []
    for i in range(count):
        base = np.stack([(x * (i + 1) % 256), (y * 2 + i * 40) % 256, (x + y) % 256], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"photo_{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time of this process, all threads: what the work cost, whatever the machine's load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- children (one process each)


def child_ours(args: argparse.Namespace) -> dict:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from captionflow.config import RunConfig
    from captionflow.handlers import DecodingOptions
    from captionflow.pipelines import build_caption_pipeline

    config = RunConfig(
        input=args.list_file,
        output=args.output,
        captioner=f"blip:{args.blip}",
        ranker=f"clip:{args.clip}",
        decoding=DecodingOptions(num_captions=args.k),
        caption_batch_size=args.caption_batch,
        rank_batch_size=args.rank_batch,
        device=args.device,
        attempts=1,
    )
    started = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
        build_caption_pipeline(pipeline, config)
    seconds = time.perf_counter() - started
    rows = Path(args.output, "metadata.jsonl").read_text().count("\n")
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds(),
        "images": rows,
        "peak_rss_mb": peak_rss_mb(),
    }


def child_original(args: argparse.Namespace) -> dict:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from benchmarks.original_design import build_original_pipeline
    from captionflow.handlers import DecodingOptions

    uris = Path(args.list_file).read_text().split()
    started = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
        build_original_pipeline(
            pipeline,
            uris,
            os.path.join(args.output, "metadata"),
            blip=args.blip,
            clip=args.clip,
            decoding=DecodingOptions(num_captions=args.k),
            device=args.device,
        )
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds(),
        "images": len(uris),
        "peak_rss_mb": peak_rss_mb(),
    }


def child_bare(args: argparse.Namespace) -> dict:
    """The same models, called on the same batches, on images decoded beforehand."""
    import torch

    from captionflow.handlers import BlipCaptioner, ClipRanker, DecodingOptions
    from captionflow.images import decode_image

    uris = Path(args.list_file).read_text().split()
    images = [decode_image(Path(u).read_bytes()) for u in uris]
    blip = BlipCaptioner.from_pretrained(
        args.blip, decoding=DecodingOptions(num_captions=args.k), device=args.device
    )
    clip = ClipRanker.from_pretrained(args.clip, device=args.device)
    # One untimed batch first: the pipeline's rate is its steady state, so is this one.
    clip.rank(images[:1], blip.caption(images[: args.caption_batch])[:1])
    sweep = {}
    for batch in args.sweep or [args.caption_batch]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started, cpu_started = time.perf_counter(), time.process_time()
        captions = []
        for i in range(0, len(images), batch):
            captions += blip.caption(images[i : i + batch])
        for i in range(0, len(images), args.rank_batch):
            clip.rank(images[i : i + args.rank_batch], captions[i : i + args.rank_batch])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        sweep[batch] = {
            "seconds": seconds,
            "cpu_seconds": time.process_time() - cpu_started,
            "images_per_second": len(images) / seconds,
            "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20
            if torch.cuda.is_available()
            else None,
        }
    main = sweep[args.caption_batch] if args.caption_batch in sweep else next(iter(sweep.values()))
    return {**main, "images": len(images), "sweep": sweep, "peak_rss_mb": peak_rss_mb()}


CHILDREN = {"ours": child_ours, "original": child_original, "bare": child_bare}


def run_child(kind: str, settings: dict, uris: list[str], work: Path, label: str) -> dict:
    folder = work / label
    folder.mkdir()
    list_file = folder / "dataset.txt"
    list_file.write_text("\n".join(uris) + "\n")
    argv = [
        sys.executable,
        "-m",
        "benchmarks.bench",
        "--child",
        kind,
        "--list-file",
        str(list_file),
        "--output",
        str(folder / "out"),
    ]
    for key, value in settings.items():
        if value is not None and key != "sweep":
            argv += [f"--{key.replace('_', '-')}", str(value)]
    for batch in settings.get("sweep") or []:
        argv += ["--sweep", str(batch)]
    # REPO first, and what the caller set kept (benchmarks/gpu.sh puts its installed wheels there).
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{label} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["images_per_second"] = result["images"] / result["seconds"]
    print(
        f"  {label:<22} {result['images']:>4} images  {result['seconds']:7.1f} s  "
        f"{result['images_per_second']:7.3f} img/s  peak {result['peak_rss_mb']:7.0f} MB",
        flush=True,
    )
    return result


# ---------------------------------------------------------------- the measurement


def machine() -> dict:
    import apache_beam
    import torch
    import transformers

    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "apache_beam": apache_beam.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rates, scale) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["bare model loop", "captionflow pipeline", "original design"]
    values = [
        results["bare"]["images_per_second"],
        results["pipeline_marginal_rate"],
        results["original"]["images_per_second"],
    ]
    rates.bar(names, values, color=["grey", "tab:blue", "tab:red"])
    rates.set_ylabel("images / s")
    rates.set_title(f"K={results['settings']['k']} candidates, {results['settings']['device']}")
    runs = results["scaling"]
    counts = [r["images"] for r in runs]
    scale.plot(counts, [r["images_per_second"] for r in runs], "o-", label="images/s")
    scale.set_xlabel("images")
    scale.set_ylabel("images / s (end to end)")
    memory = scale.twinx()
    memory.plot(
        counts, [r["peak_rss_mb"] for r in runs], "s--", color="tab:orange", label="peak MB"
    )
    memory.set_ylabel("peak memory (MB)")
    scale.set_title("scaling")
    scale.set_ylim(bottom=0)
    memory.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def streaming_check(work: Path, settings: dict, few: int) -> list[dict]:
    """Peak memory at `few` and 8x `few` images with tiny models: with the models' own memory
    out of the way, anything the pipeline held per image would show here."""
    from captionflow.tiny_models import build_tiny_models

    blip, clip = build_tiny_models(str(work / "tiny"))
    uris = make_images(work / "many", 8 * few)
    tiny = settings | {"blip": blip, "clip": clip, "device": "cpu"}
    return [run_child("ours", tiny, uris[:n], work, f"tiny models {n}") for n in (few, 8 * few)]


def measure(args: argparse.Namespace) -> dict:
    from benchmarks.models import build_blip_base, build_clip_b32

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="captionflow-bench-"))
    n = args.images
    print(f"building models (layers: {args.layers or 'full'}) and {4 * n} images in {work}")
    blip = build_blip_base(str(work / "blip"), layers=args.layers)
    clip = build_clip_b32(str(work / "clip"), layers=args.layers)
    uris = make_images(work / "images", 4 * n)
    settings = {
        "blip": blip,
        "clip": clip,
        "k": args.k,
        "device": args.device,
        "caption_batch": args.caption_batch,
        "rank_batch": args.rank_batch,
    }

    results: dict = {
        "settings": {
            "k": args.k,
            "layers": args.layers or 12,
            "device": args.device,
            "images": n,
            "caption_batch": args.caption_batch,
            "rank_batch": args.rank_batch,
            "decoding": "sampling, top_p 0.9, 5-30 new tokens",
            "image_size": "640x480 JPEG",
        },
        "machine": machine(),
    }
    # On a shared machine the speed drifts over minutes: the bare loop runs before and after the
    # pipelines and its mean is used; CPU-time rates, immune to stolen time, are kept beside.
    bare_runs = [
        run_child("bare", settings | {"sweep": args.sweep}, uris[: 2 * n], work, "bare (before)")
    ]
    results["scaling"] = [
        run_child("ours", settings, uris[:count], work, f"pipeline {count}")
        for count in (n, 2 * n, 4 * n)
    ]
    if not args.quick:
        bare_runs.append(run_child("bare", settings, uris[: 2 * n], work, "bare (after)"))
    results["original"] = run_child("original", settings, uris[:n], work, "original design")
    results["bare"] = bare_runs[0] | {
        "images_per_second": mean(r["images_per_second"] for r in bare_runs),
        "images_per_cpu_second": mean(r["images"] / r["cpu_seconds"] for r in bare_runs),
        "runs_images_per_second": [r["images_per_second"] for r in bare_runs],
    }

    results["streaming"] = streaming_check(work, settings, few=25 if args.quick else 50)
    first, last = results["scaling"][0], results["scaling"][-1]
    added = last["images"] - first["images"]
    results["pipeline_marginal_rate"] = added / (last["seconds"] - first["seconds"])
    results["pipeline_marginal_cpu_rate"] = added / (last["cpu_seconds"] - first["cpu_seconds"])
    results["ratios"] = {
        "pipeline_vs_bare_loop": (
            results["pipeline_marginal_rate"] / results["bare"]["images_per_second"]
        ),
        "pipeline_vs_bare_loop_cpu_time": (
            results["pipeline_marginal_cpu_rate"] / results["bare"]["images_per_cpu_second"]
        ),
        "pipeline_vs_bare_loop_end_to_end": (
            results["scaling"][1]["images_per_second"] / results["bare"]["images_per_second"]
        ),
        "speedup_vs_original_design": (
            first["images_per_second"] / results["original"]["images_per_second"]
        ),
        "memory_growth_4n_vs_n": last["peak_rss_mb"] / first["peak_rss_mb"],
        "memory_growth_tiny_models_8x_images": (
            results["streaming"][1]["peak_rss_mb"] / results["streaming"][0]["peak_rss_mb"]
        ),
    }
    results["benchmark_seconds"] = time.perf_counter() - started
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 layer, 3 images: a smoke run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, help="transformer layers (default: full, 12)")
    parser.add_argument("--images", type=int, help="N: runs use N, 2N and 4N images")
    parser.add_argument("--k", type=int, default=10, help="candidates per image")
    parser.add_argument("--caption-batch", type=int)
    parser.add_argument("--rank-batch", type=int)
    parser.add_argument("--sweep", type=int, action="append", help="caption batch sizes to try")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    parser.add_argument("--list-file", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--blip", help=argparse.SUPPRESS)
    parser.add_argument("--clip", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return

    gpu = args.device.startswith("cuda")
    args.layers = args.layers or (1 if args.quick else None)
    args.images = args.images or (3 if args.quick else (32 if gpu else 8))
    args.caption_batch = args.caption_batch or (32 if gpu else 4)
    args.rank_batch = args.rank_batch or (64 if gpu else 16)
    if gpu and not args.sweep:
        args.sweep = [8, 16, 32, 64]
    if args.sweep and args.caption_batch not in args.sweep:
        args.sweep.append(args.caption_batch)

    results = measure(args)
    name = f"{'gpu' if gpu else 'cpu'}{'-quick' if args.quick else ''}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / f"{name}.png")

    ratios = results["ratios"]
    print(f"\nresults: {out / name}.json and .png ({results['benchmark_seconds']:.0f} s)")
    print(
        f"  pipeline / bare model loop (steady state): {ratios['pipeline_vs_bare_loop']:.2f}"
        f"  (by CPU time: {ratios['pipeline_vs_bare_loop_cpu_time']:.2f}; end to end, with "
        f"start-up: {ratios['pipeline_vs_bare_loop_end_to_end']:.2f})"
    )
    print(
        f"  pipeline vs original design at K={args.k}: {ratios['speedup_vs_original_design']:.2f}x"
    )
    print(
        f"  peak memory at 4N vs N images: {ratios['memory_growth_4n_vs_n']:.2f}x; "
        f"with tiny models at 8x the images: "
        f"{ratios['memory_growth_tiny_models_8x_images']:.2f}x"
    )
    if results["bare"]["sweep"] and len(results["bare"]["sweep"]) > 1:
        best = max(results["bare"]["sweep"].items(), key=lambda kv: kv[1]["images_per_second"])
        print(f"  best caption batch size: {best[0]} ({best[1]['images_per_second']:.1f} img/s)")


if __name__ == "__main__":
    main()
