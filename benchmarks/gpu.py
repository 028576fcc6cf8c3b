"""Every GPU measurement in one run (under 8 minutes): BLIP-base K=5 + CLIP-B/32 architectures
with random weights, 640x480 JPEGs.

    bash benchmarks/gpu.sh                 # on an offline GPU box (installs the .whl bundle)
    python -m benchmarks.gpu               # where captionflow's environment is installed

0. BLIP decoding: the fast loop's token ids against `generate`'s in float16 (equal or near-equal),
   and milliseconds per decode step at 160, 1,280 and 2,560 rows, fast vs `generate`'s forward.
1. Engine bare, per batch size up to 512: the models fed ready uint8 batches already in host
   memory (copy to the GPU included): images/s, CPU ms per image, peak GPU memory.
2. The pipeline (the CLI, local worker processes decoding, one shared engine on the GPU) at N
   and 3N images: the marginal images/s (start-up cancels), CPU ms per image of all processes,
   and the GPU's busy fraction sampled while it runs; pipeline / engine bare.
3. The same pipeline with zero-cost stand-ins for the models, in its steady state: how many
   images/s the workers can decode and send at all (the feeding's ceiling).

A short table is printed last; everything goes to benchmarks/results/gpu.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks.decoding import milliseconds
from benchmarks.feed import REPO, engine_bare, machine, pipeline, steady_pipeline

DEADLINE_S = 420  # leave gpu.sh's 450 s limit some room


class GpuSampler:
    """The GPU's utilisation (NVML: the share of time a kernel ran), sampled every 50 ms."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import torch

        while not self._stop.wait(0.05):
            try:
                self.samples.append(torch.cuda.utilization() / 100)
            except Exception:  # no NVML here: no figure rather than a wrong one
                return

    def busy(self, skip_s: float = 0) -> float | None:
        kept = self.samples[int(skip_s / 0.05) :]
        return sum(kept) / len(kept) if kept else None


def make_images_parallel(folder: Path, count: int) -> list[str]:
    from benchmarks.bench import make_images

    chunks = [(folder / f"part{i}", min(256, count - i * 256)) for i in range((count + 255) // 256)]
    with ProcessPoolExecutor() as pool:
        parts = pool.map(make_images, *zip(*chunks, strict=True))
    return [uri for part in parts for uri in part]


def decoding(blip: str, device: str, rows: list[int]) -> dict:
    """Token ids of both decoders (float16 on a GPU), then milliseconds per decode step."""
    from benchmarks.decoding import check, step_times

    dtype = "float16" if device.startswith("cuda") else "float32"
    print(f"same token ids as generate, {dtype}:", flush=True)
    result = {"check": check(blip, device, dtype, images=4), "dtype": dtype}
    print("milliseconds per decode step:", flush=True)
    result["steps"] = step_times(blip, device, dtype, rows)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="32,64,128,256,512", help="engine batch sweep")
    parser.add_argument("--images", type=int, default=2048, help="N (pipeline runs N and 3N)")
    parser.add_argument("--workers", type=int, default=12, help="local worker processes")
    parser.add_argument("--request", type=int, default=64, help="images per worker request")
    parser.add_argument("--seconds", type=float, default=6, help="timed seconds per batch size")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu.json"))
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script")
    parser.add_argument("--layers", type=int, help="fewer layers per stack (smoke runs)")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    started = time.monotonic()

    import torch

    from benchmarks.models import build_blip_base, build_clip_b32

    work = Path(tempfile.mkdtemp(prefix="captionflow-gpu-"))
    blip = build_blip_base(str(work / "blip-base"), layers=args.layers)
    clip = build_clip_b32(str(work / "clip-b32"), layers=args.layers)
    uris = make_images_parallel(work / "images", 3 * args.images)
    result: dict = {"machine": machine(args.device), "settings": vars(args), "bare": {}}
    print(f"set up in {time.monotonic() - started:.0f} s: {result['machine']}", flush=True)
    try:
        result["decoding"] = decoding(blip, args.device, [160, 1280, 2560] if cuda else [10, 20])
    except Exception as error:  # the engine and pipeline figures still matter
        print(f"decoding measurements failed: {type(error).__name__}: {error}", flush=True)
        result["decoding"] = {"error": f"{type(error).__name__}: {error}"[:500]}
    if cuda:
        torch.cuda.empty_cache()

    for batch in [int(b) for b in args.batches.split(",")]:
        if time.monotonic() - started > DEADLINE_S / 3:
            print(f"batch {batch}: skipped (time)", flush=True)
            continue
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            point = engine_bare(
                blip, clip, uris, batch, args.device, seconds=args.seconds, threads=1 if cuda else 0
            )
        except torch.OutOfMemoryError as error:
            result["bare"][batch] = {"error": f"out of memory: {str(error)[:120]}"}
            torch.cuda.empty_cache()
            continue
        point["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0
        result["bare"][batch] = point
        print(f"engine bare, batch {batch}: {point}", flush=True)
    rates = {b: p["images_per_s"] for b, p in result["bare"].items() if "images_per_s" in p}
    best = max(rates, key=rates.__getitem__)
    if cuda:
        torch.cuda.empty_cache()

    settings = argparse.Namespace(
        request=min(args.request, best), batch=best, workers=args.workers, device=args.device
    )
    runs = {}
    for count in (args.images, 3 * args.images):
        if time.monotonic() - started > DEADLINE_S - 90:
            print(f"pipeline at {count}: skipped (time)", flush=True)
            break
        listing = work / f"list-{count}.txt"
        listing.write_text("\n".join(uris[:count]) + "\n")
        with GpuSampler() as gpu:
            runs[count] = pipeline(blip, clip, str(listing), str(work / f"out-{count}"), settings)
        runs[count]["gpu_busy"] = gpu.busy(skip_s=runs[count]["seconds"] / 2)
        print(f"pipeline, {count} images: {runs[count]}", flush=True)
    result["pipeline"] = runs
    if time.monotonic() - started < DEADLINE_S - 60:
        # The feeding's own ceiling: the same pipeline with zero-cost stand-ins for the models.
        try:
            alone = steady_pipeline(blip, clip, uris, work, settings, models=False)
        except SystemExit as failed:  # keep the figures measured so far
            print(f"pipeline with no models failed: {str(failed)[-500:]}", flush=True)
        else:
            result["no_models_pipeline"] = alone
            print(f"pipeline with no models, {len(uris)} images: {alone}", flush=True)
    if len(runs) == 2:
        extra = 2 * args.images
        seconds = runs[3 * args.images]["seconds"] - runs[args.images]["seconds"]
        cpu = runs[3 * args.images]["cpu_seconds"] - runs[args.images]["cpu_seconds"]
        result["pipeline_images_per_s"] = extra / seconds
        result["pipeline_cpu_ms_per_image"] = cpu / extra * 1000
        result["pipeline_over_bare"] = result["pipeline_images_per_s"] / rates[best]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    report(result, best, time.monotonic() - started)


def report(result: dict, best: int, seconds: float) -> None:
    print(f"\n{result['machine']['device']}, torch {result['machine']['torch']}, {seconds:.0f} s")
    print(
        "| decode rows | fast ms/step | compiled ms/step (first 10 steps, s; CUDA graph skips) "
        "| generate ms/step |"
    )
    print("|---|---|---|---|")
    for rows, point in result["decoding"].get("steps", {}).items():
        first = point.get("compiled_first_steps_s")
        skips = point.get("compiled_cudagraph_skips", "-")
        print(
            f"| {rows} | {milliseconds(point, 'fast')} | {milliseconds(point, 'compiled')} "
            f"({'-' if first is None else f'{first:.1f}'}; {skips}) "
            f"| {milliseconds(point, 'reference')} |"
        )
    for name, same in result["decoding"].get("check", {}).items():
        print(f"token ids, {name}: {same['identical_rows']}/{same['rows']} rows identical")
    print("| engine batch | images/s | CPU ms/img | peak GPU MiB |")
    print("|---|---|---|---|")
    for batch, point in result["bare"].items():
        if "error" in point:
            print(f"| {batch} | {point['error']} | | |")
        else:
            print(
                f"| {batch} | {point['images_per_s']:.0f} | {point['cpu_ms_per_image']:.2f} "
                f"| {point['peak_gpu_mib']:.0f} |"
            )
    for count, run in result.get("pipeline", {}).items():
        busy = run.get("gpu_busy")
        print(
            f"pipeline {count} images: {run['seconds']:.1f} s, {run['cpu_seconds']:.0f} CPU s, "
            f"GPU busy {'n/a' if busy is None else f'{busy:.0%}'} (second half)"
        )
    if "no_models_pipeline" in result:
        alone = result["no_models_pipeline"]
        print(
            f"pipeline with no models (the feeding's ceiling): {alone['images_per_s']:.0f} "
            f"images/s, {alone['cpu_ms_per_image']:.2f} CPU ms/img, all processes"
        )
    if "pipeline_over_bare" in result:
        print(
            f"pipeline (marginal) {result['pipeline_images_per_s']:.0f} images/s, "
            f"{result['pipeline_cpu_ms_per_image']:.2f} CPU ms/img; engine bare at batch {best}: "
            f"pipeline / engine bare = {result['pipeline_over_bare']:.2f}"
        )


if __name__ == "__main__":
    main()
