"""Can the pipeline feed the models? CPU per image outside the models' arithmetic, per phase,
and the pipeline's rate against the models' own (the engine fed ready batches in memory).

    python -m benchmarks.feed                      # CPU: about 9 minutes here
    python -m benchmarks.feed --device cuda        # on a GPU box (see benchmarks/gpu.sh)

1. **CPU per image**: models with real input sizes (BLIP 384 px, CLIP 224 px) but next to no
   arithmetic, on 640x480 JPEGs. Each phase is priced alone, single-threaded (read, decode,
   views, stack and cross to the engine, model call, write); then the whole pipeline, in worker
   processes with a shared engine, as the CPU seconds of every process (the CLI, its workers,
   the engine) per image in its steady state; and the same pipeline with zero-cost stand-ins
   for the models (`benchmarks.nomodels`): the pipeline alone.
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
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

from benchmarks import nomodels

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
    from captionflow.views import StackSpace, ViewBatch, make_views

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

    space = StackSpace(shared=True)  # as the engine client stacks a thread's requests

    def cross(group: list) -> None:  # stack, and the pickling of both ends of the crossing
        pickle.loads(ForkingPickler.dumps(ViewBatch.stack(group, space)))

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
    at `threads` threads (0: as many as the pipeline's engine gets, one per core). Two callers
    keep a batch waiting while one computes, as the pipeline's workers do: the engine captions
    the next batch while it ranks this one."""
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
    started, cpu = time.perf_counter(), time.process_time()

    def call() -> int:
        rounds = 0
        while rounds < 2 or time.perf_counter() - started < seconds:
            engine.caption_and_rank(stacked)
            rounds += 1
        return rounds

    with ThreadPoolExecutor(2) as callers:
        rounds = sum(callers.map(lambda _: call(), range(2)))
    elapsed = time.perf_counter() - started
    return {
        "images_per_s": rounds * batch / elapsed,
        "cpu_ms_per_image": (time.process_time() - cpu) / (rounds * batch) * 1000,
    }


def cli_argv(
    blip: str,
    clip: str,
    list_file: str,
    out: str,
    args: argparse.Namespace,
    every: int = 1000,
    models: bool = True,
) -> list[str]:
    """The CLI run that the pipeline measurements time: `every` lines per part file; without
    `models`, BLIP's and CLIP's zero-cost stand-ins (`benchmarks.nomodels`)."""
    launcher = ["-m", "captionflow"] if models else ["-c", nomodels.LAUNCHER]
    captioner, ranker = ("blip", "clip") if models else ("no-captioner", "no-ranker")
    return [
        sys.executable, *launcher, "run", "--input", list_file, "--output", out,
        "--captioner", f"{captioner}:{blip}", "--ranker", f"{ranker}:{clip}",
        "--caption-batch-size", str(args.request), "--engine-batch-size", str(args.batch),
        "--rank-batch-size", str(args.batch), "--engine", "shared", "--device", args.device,
        "--checkpoint-every", str(every), "--attempts", "1",
        "--min-new-tokens", str(TOKENS), "--max-new-tokens", str(TOKENS),
        "--direct_num_workers", str(args.workers), "--direct_running_mode", "multi_processing",
    ]  # fmt: skip


def cli_env(threads: int = 0, **extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(REPO / "src"), str(REPO)])  # the repository: benchmarks.nomodels
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **extra}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def pipeline(
    blip: str, clip: str, list_file: str, out: str, args: argparse.Namespace, threads: int = 0
) -> dict:
    """The CLI in a fresh process: wall seconds and CPU seconds of it and all its children.
    `threads`: torch's threads in every process (0: torch's default)."""
    argv = cli_argv(blip, clip, list_file, out, args)
    cpu, started = children_cpu(), time.perf_counter()
    done = subprocess.run(argv, env=cli_env(threads), capture_output=True, text=True)
    wall, cpu = time.perf_counter() - started, children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"pipeline failed:\n{done.stderr[-3000:]}")
    return {"seconds": wall, "cpu_seconds": cpu}


PART_LINES = 50  # lines per part file in the steady-state run: its progress marks
WINDOW = (0.25, 0.85)  # the share of images done between which the steady state is timed


def steady_pipeline(
    blip: str,
    clip: str,
    uris: list[str],
    work: Path,
    args: argparse.Namespace,
    threads: int = 1,
    models: bool = True,
) -> dict:
    """One CLI run on `uris`, timed in its steady state: between 25% and 85% of the images
    written (part files of `PART_LINES` lines mark the progress), the images/s and the CPU
    seconds of every process of the run (read from /proc: the launcher, each worker, the
    engine, whoever their parent) per image, by kind of process. Start-up and the last
    bundles fall outside the window, so one run is enough. Without `models`, zero-cost
    stand-ins take BLIP's and CLIP's place: what is left is the pipeline alone."""
    listing = work / f"steady-{len(uris)}.txt"
    listing.write_text("\n".join(uris) + "\n")
    out = work / f"steady-out-{len(uris)}"
    shutil.rmtree(out, ignore_errors=True)
    argv = cli_argv(blip, clip, str(listing), str(out), args, every=PART_LINES, models=models)
    # The engine's batch sizes, logged often enough to read them at the end.
    env = cli_env(threads, CAPTIONFLOW_ENGINE_LOG_EVERY_S="2")
    log = work / "steady.log"
    with open(log, "w") as stderr:
        run = subprocess.Popen(argv, env=env, stderr=stderr, start_new_session=True)
        marks: dict[float, tuple[int, float, dict[int, float]]] = {}
        kinds: dict[int, str] = {}  # this run's pids (a later run may reuse them)
        while run.poll() is None:
            done = PART_LINES * len(list((out / ".metadata.jsonl.parts").glob("part-*.jsonl")))
            for share in WINDOW:
                if share not in marks and done >= share * len(uris):
                    marks[share] = (done, time.perf_counter(), _session_cpu(run.pid, kinds))
            time.sleep(0.05)
    if run.returncode != 0 or len(marks) < 2:
        raise SystemExit(f"pipeline failed:\n{log.read_text()[-3000:]}")
    (done0, wall0, cpu0), (done1, wall1, cpu1) = marks[WINDOW[0]], marks[WINDOW[1]]
    images = done1 - done0
    if images == 0:  # both marks passed in one poll: a run too small to time
        raise SystemExit(f"a steady-state window of 0 images: use more than {len(uris)}")
    if images < 4 * args.request * args.workers:  # records arrive a request at a time
        print(f"warning: a window of {images} images is too short for stable figures")
    by_kind: dict[str, float] = {}
    for pid, seconds in cpu1.items():
        kind = kinds.get(pid, "other")
        by_kind[kind] = by_kind.get(kind, 0) + (seconds - cpu0.get(pid, 0)) / images * 1000
    engine_log = [line for line in log.read_text().splitlines() if "engine on" in line]
    return {
        "images": images,
        "images_per_s": images / (wall1 - wall0),
        "cpu_ms_per_image": sum(by_kind.values()),
        "cpu_ms_per_image_by_process": by_kind,
        "engine_log": engine_log[-1].split("engine on", 1)[1] if engine_log else None,
    }


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _session_cpu(session: int, kinds: dict[int, str]) -> dict[int, float]:
    """CPU seconds (user + system) of every process of `session`, by pid; each new pid's
    kind of process goes into `kinds`."""
    seconds = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != session:
                continue
            pid = int(entry.name)
            if pid not in kinds:
                command = (entry / "cmdline").read_bytes()
                kinds[pid] = (
                    "engine" if b"spawn_main" in command
                    else "workers" if b"sdk_worker_main" in command
                    else "launcher" if b"captionflow" in command
                    else "other"
                )  # fmt: skip
            seconds[pid] = (int(fields[11]) + int(fields[12])) / _TICK
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return seconds


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
    parser.add_argument(
        "--request",
        type=int,
        default=128,
        help="images per worker request (as many as the engine batch: two workers, each with "
        "one request in flight, would never fill it with smaller ones)",
    )
    parser.add_argument("--batch", type=int, default=128, help="engine batch (merged)")
    parser.add_argument(
        "--repeat", type=int, default=2, help="engine bare and pipeline runs of part 1, each"
    )
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
    # With next to no arithmetic, the engine's CPU work is what it is on a GPU (launching the
    # models' steps): single-threaded, as a GPU engine runs; idle OpenMP threads spinning on
    # these tiny tensors would only add CPU that no GPU deployment pays. Bare and pipeline
    # alternate, `--repeat` times each, and their means are compared: this shared machine's
    # speed drifts over minutes.
    # Without models the pipeline runs several times faster: three times the images (the same
    # files under other names) keep its window as long.
    many = linked_copies(uris, work / "links", 3)
    bare, piped, alone = [], [], []
    for _ in range(args.repeat):
        bare.append(engine_bare(blip, clip, uris, args.batch, args.device, threads=1))
        piped.append(steady_pipeline(blip, clip, uris[: 2 * args.images], work, args))
        alone.append(steady_pipeline(blip, clip, many, work, args, models=False))
    result["negligible_bare_runs"], result["negligible_pipeline_runs"] = bare, piped
    result["negligible_bare"] = _mean(bare)
    result["negligible_pipeline"] = _mean(piped)
    result["no_models_pipeline_runs"] = alone
    result["no_models_pipeline"] = _mean(alone)
    report(result)


def linked_copies(uris: list[str], folder: Path, times: int) -> list[str]:
    """`uris` under `times` names each (hard links: the same bytes, distinct paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for copy in range(times):
        for uri in uris:
            link = folder / f"{copy}-{Path(uri).name}"
            if not link.exists():
                os.link(uri, link)
            copies.append(str(link))
    return copies


def _mean(runs: list[dict]) -> dict:
    """The runs' numbers averaged (nested per-process figures too); the last run's others."""
    mean = dict(runs[-1])
    for key, value in runs[-1].items():
        if isinstance(value, (int, float)):
            mean[key] = sum(run[key] for run in runs) / len(runs)
        elif isinstance(value, dict):
            mean[key] = {k: sum(run[key].get(k, 0) for run in runs) / len(runs) for k in value}
    return mean


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
    by_process = ", ".join(
        f"{kind} {ms:.2f}" for kind, ms in sorted(piped["cpu_ms_per_image_by_process"].items())
    )
    runs = ", ".join(
        f"{run['cpu_ms_per_image']:.2f}" for run in result.get("negligible_pipeline_runs", [])
    )
    print(
        f"whole pipeline ({result['settings']['workers']} workers + shared engine), steady "
        f"state ({piped['images']} images): {piped['cpu_ms_per_image']:.2f} CPU ms per image, "
        f"all processes ({by_process}; runs: {runs}); {piped['images_per_s']:.1f} images/s\n"
        f"engine bare: {bare['cpu_ms_per_image']:.2f} CPU ms per image, "
        f"{bare['images_per_s']:.1f} images/s\n"
        f"outside the model call: {piped['cpu_ms_per_image'] - bare['cpu_ms_per_image']:.2f} "
        f"CPU ms per image; pipeline / engine bare = "
        f"{piped['images_per_s'] / bare['images_per_s']:.2f}\n"
        f"engine's own count: {piped['engine_log']}"
    )
    if "no_models_pipeline" in result:
        alone = result["no_models_pipeline"]
        runs = ", ".join(
            f"{run['cpu_ms_per_image']:.2f}" for run in result["no_models_pipeline_runs"]
        )
        print(
            f"no models (zero-cost stand-ins), steady state ({alone['images']} images): "
            f"{alone['cpu_ms_per_image']:.2f} CPU ms per image, all processes (runs: {runs}); "
            f"{alone['images_per_s']:.1f} images/s"
        )


if __name__ == "__main__":
    main()
