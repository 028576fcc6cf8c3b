"""`make bench-scale`: how the pipeline's cost grows from 10 thousand to a million images.

The models cost nothing (`benchmarks.nomodels`' stand-ins, on tiny checkpoints whose views are
32 px), so what is measured is the pipeline itself: listing, reading, decoding, the engine's
batches, the part files, the join, the summary. The inputs are small JPEGs from a pool of
`POOL`, each under many names (hard links: distinct paths, the same bytes).

At each size, each in a fresh process tree, sampled from /proc every `SAMPLE_S`:
- the input stages alone (`ReadImagePaths` of a list file, and of a folder), and
- the whole job through the CLI (2 SDK workers, the shared engine),
- the join of its part files alone (the metadata split back into parts of
  `--checkpoint-every` lines, joined by `WriteJsonLines`' own join step),
with wall seconds, CPU milliseconds per image (every process, by kind) and the peak memory
(RSS) of each kind of process. `--failing` runs only the job, on one image and N missing
files: the memory of a run in which nearly every image fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks import nomodels
from benchmarks.feed import cli_env

SIZES = (10_000, 100_000, 1_000_000)
POOL = 1000
PER_FOLDER = 10_000
SAMPLE_S = 0.25
CHECKPOINT_EVERY = 100  # the CLI's default
RESULTS = Path(__file__).parent / "results"
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")

# The stages alone: `python -c STAGE INPUT` lists and counts, `JOIN PARTS_DIR DESTINATION`
# joins the parts there.
STAGE = """
import sys, tempfile, apache_beam as beam
from captionflow import ReadImagePaths
with tempfile.TemporaryDirectory() as spill, beam.Pipeline("FnApiRunner") as p:
    paths = p | ReadImagePaths(sys.argv[1], spill_dir=spill)  # as the CLI runs it locally
    paths | beam.combiners.Count.Globally() | beam.Map(print)
"""
JOIN = """
import glob, sys, apache_beam as beam
from captionflow.transforms.write import JoinParts
parts = sorted(glob.glob(sys.argv[1] + "/part-*.jsonl"))
with beam.Pipeline("FnApiRunner") as p:
    p | beam.Create(parts) | JoinParts(sys.argv[2])
"""


def pool_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(POOL):
        path = folder / f"pool-{i:04d}.jpg"
        if not path.exists():
            pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=80)
        paths.append(path)
    return paths


def linked_inputs(pool: list[Path], root: Path, count: int) -> Path:
    """`count` distinct image paths under `root` (folders of `PER_FOLDER`), and their list."""
    listing = root / "dataset.txt"
    if listing.exists():
        return listing
    names = []
    for i in range(count):
        folder = root / f"d{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        link = folder / f"{i:07d}.jpg"
        if not link.exists():
            os.link(pool[i % len(pool)], link)
        names.append(str(link))
    listing.with_suffix(".tmp").write_text("\n".join(names) + "\n")
    listing.with_suffix(".tmp").rename(listing)
    return listing


def _kind(pid: int) -> str:
    command = Path(f"/proc/{pid}/cmdline").read_bytes()
    if b"spawn_main" in command:
        return "engine"
    if b"sdk_worker_main" in command:
        return "workers"
    return "launcher"


def measured(argv: list[str], images: int, log: Path) -> dict:
    """Run `argv` in a session of its own: wall seconds; CPU ms per image of all its
    processes (exact, from rusage) and by kind (from /proc samples); peak RSS by kind."""
    peak: dict[str, int] = {}
    cpu: dict[int, float] = {}
    kinds: dict[int, str] = {}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(log, "w") as output:
        run = subprocess.Popen(
            argv, env=cli_env(1), stdout=output, stderr=output, start_new_session=True
        )
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                for entry in Path("/proc").iterdir():
                    if not entry.name.isdigit():
                        continue
                    try:
                        stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                        if int(stat[3]) != run.pid:
                            continue
                        pid = int(entry.name)
                        kind = kinds.setdefault(pid, _kind(pid))
                        rss = int((entry / "statm").read_text().split()[1]) * _PAGE
                        peak[kind] = max(peak.get(kind, 0), rss)
                        cpu[pid] = (int(stat[11]) + int(stat[12])) / _TICK
                    except (OSError, IndexError, ValueError):
                        continue
                stop.wait(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        run.wait()
        stop.set()
        sampler.join()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed:\n{log.read_text()[-3000:]}")
    total = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    by_kind: dict[str, float] = {}
    for pid, seconds in cpu.items():
        by_kind[kinds[pid]] = by_kind.get(kinds[pid], 0) + seconds
    return {
        "seconds": round(wall, 2),
        "cpu_ms_per_image": round(total / images * 1000, 4),
        "cpu_ms_per_image_by_process": {k: round(v / images * 1000, 4) for k, v in by_kind.items()},
        "peak_rss_mb": {kind: round(rss / 2**20, 1) for kind, rss in sorted(peak.items())},
        "processes": {
            kind: list(kinds.values()).count(kind) for kind in sorted(set(kinds.values()))
        },
    }


def job_argv(listing: Path, out: Path, models: tuple[str, str], workers: int) -> list[str]:
    blip, clip = models
    return [
        sys.executable, "-c", nomodels.LAUNCHER, "run", "--input", str(listing),
        "--output", str(out), "--captioner", f"no-captioner:{blip}",
        "--ranker", f"no-ranker:{clip}", "--engine", "shared", "--attempts", "1",
        "--checkpoint-every", str(CHECKPOINT_EVERY),
        "--direct_num_workers", str(workers), "--direct_running_mode", "multi_processing",
    ]  # fmt: skip


def split_into_parts(metadata: Path, parts: Path) -> int:
    """The job's records back into parts of `CHECKPOINT_EVERY` lines, as the job wrote them."""
    parts.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(metadata, "rb") as file:
        while chunk := [line for _, line in zip(range(CHECKPOINT_EVERY), file, strict=False)]:
            (parts / f"part-{count:07d}.jsonl").write_bytes(b"".join(chunk))
            count += 1
    return count


def input_stages(size: int, root: Path, listing: Path, work: Path) -> dict:
    """`ReadImagePaths` alone, of the list file, the folder and a glob over it."""
    stage = [sys.executable, "-c", STAGE]
    return {
        "list_stage": measured([*stage, str(listing)], size, work / "list.log"),
        "folder_stage": measured([*stage, str(root)], size, work / "folder.log"),
        "glob_stage": measured([*stage, str(root / "**" / "*.jpg")], size, work / "glob.log"),
    }


def one_size(
    size: int,
    pool: list[Path],
    work: Path,
    models: tuple[str, str],
    workers: int,
    stages_only: bool,
) -> dict:
    root = work / f"inputs-{size}"
    listing = linked_inputs(pool, root, size)
    result: dict = {"images": size, **input_stages(size, root, listing, work)}
    if stages_only:
        print(json.dumps(result), flush=True)
        return result
    out = work / f"out-{size}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    result["job"] = measured(job_argv(listing, out, models, workers), size, work / "job.log")
    summary = json.loads((out / "summary.json").read_text())
    result["summary"] = {key: summary[key] for key in ("images", "captioned", "failed")}
    if summary["captioned"] != size:
        raise SystemExit(f"{size} images in, {summary['captioned']} captioned: {summary}")
    parts = out / "parts-again"
    result["parts"] = split_into_parts(out / "metadata.jsonl", parts)
    joined = out / "joined.jsonl"
    result["join"] = measured(
        [sys.executable, "-c", JOIN, str(parts), str(joined)], size, work / "join.log"
    )
    if joined.stat().st_size != (out / "metadata.jsonl").stat().st_size:
        raise SystemExit("the join lost bytes")
    subprocess.run(["rm", "-rf", str(out)], check=True)
    print(json.dumps(result), flush=True)
    return result


def failing_job(
    size: int, pool: list[Path], work: Path, models: tuple[str, str], workers: int
) -> dict:
    """The job on one image (a run that captions nothing fails) and `size` missing files."""
    listing = work / f"missing-{size}.txt"
    if not listing.exists():
        missing = (
            work / "missing" / f"d{i // PER_FOLDER:04d}" / f"{i:07d}.jpg" for i in range(size)
        )
        listing.write_text("".join(f"{path}\n" for path in [pool[0], *missing]))
    out = work / f"out-failing-{size}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    job = measured(job_argv(listing, out, models, workers), size, work / "failing.log")
    summary = json.loads((out / "summary.json").read_text())
    if summary["failed"] != size:
        raise SystemExit(f"{size} missing files, {summary['failed']} failed: {summary}")
    subprocess.run(["rm", "-rf", str(out)], check=True)
    result = {"images": size, "failed": summary["failed"], "failing_job": job}
    print(json.dumps(result), flush=True)
    return result


def plot(results: list[dict], growth_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["images"] for r in results]
    figure, (time_axis, cpu_axis, memory_axis) = plt.subplots(1, 3, figsize=(15, 4.2))
    for stage, label, marker in (
        ("job", "whole job", "o-"),
        ("join", "join alone", "s-"),
        ("list_stage", "list file alone", "^-"),
        ("folder_stage", "folder alone", "v-"),
    ):
        time_axis.loglog(sizes, [r[stage]["seconds"] for r in results], marker, label=label)
    time_axis.set(xlabel="images", ylabel="wall seconds", title="time")
    time_axis.legend()
    ends = [row["to"] for row in growth_rows]
    cpu_axis.semilogx(
        ends, [row["cpu_ms_per_added_image"] for row in growth_rows], "o-", label="CPU"
    )
    cpu_axis.semilogx(
        ends, [row["wall_ms_per_added_image"] for row in growth_rows], "s-", label="wall"
    )
    cpu_axis.set(
        xlabel="images (each point: from the size before)",
        ylabel="ms per added image (all processes)",
        title="whole job: cost per added image",
    )
    cpu_axis.set_ylim(bottom=0)
    cpu_axis.legend()
    kinds = sorted({kind for r in results for kind in r["job"]["peak_rss_mb"]})
    for kind in kinds:
        peaks = [r["job"]["peak_rss_mb"].get(kind, 0) for r in results]
        memory_axis.semilogx(sizes, peaks, "o-", label=f"job: {kind}")
    for stage, marker in (("list_stage", "^--"), ("join", "s--")):
        peaks = [max(r[stage]["peak_rss_mb"].values()) for r in results]
        memory_axis.semilogx(sizes, peaks, marker, label=f"{stage.removesuffix('_stage')} alone")
    memory_axis.set(xlabel="images", ylabel="peak RSS, MB", title="peak memory per process")
    memory_axis.set_ylim(bottom=0)
    memory_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def growth(results: list[dict]) -> list[dict]:
    """Between successive sizes, the job's marginal cost per added image (start-up cancels
    out), and each kind of process's peak memory against the smallest run's."""
    rows = []
    for small, large in itertools.pairwise(results):
        added = large["images"] - small["images"]
        small_job, large_job = small["job"], large["job"]

        def cpu_seconds(job: dict, images: int) -> float:
            return job["cpu_ms_per_image"] * images / 1000

        rows.append(
            {
                "from": small["images"],
                "to": large["images"],
                "wall_ms_per_added_image": round(
                    (large_job["seconds"] - small_job["seconds"]) / added * 1000, 4
                ),
                "cpu_ms_per_added_image": round(
                    (
                        cpu_seconds(large_job, large["images"])
                        - cpu_seconds(small_job, small["images"])
                    )
                    / added
                    * 1000,
                    4,
                ),
                "peak_rss_ratio": {
                    kind: round(mb / small_job["peak_rss_mb"][kind], 3)
                    for kind, mb in large_job["peak_rss_mb"].items()
                    if kind in small_job["peak_rss_mb"]
                },
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default="/tmp/captionflow-scale")
    parser.add_argument("--name", default="scale")
    parser.add_argument(
        "--report", action="store_true", help="only print and plot the saved results again"
    )
    parser.add_argument(
        "--stages-only", action="store_true", help="only the input stages (list, folder, glob)"
    )
    parser.add_argument(
        "--failing", action="store_true", help="only the job, on one image and N missing files"
    )
    args = parser.parse_args()
    saved = RESULTS / f"{args.name}{'-failing' if args.failing else ''}.json"
    report = json.loads(saved.read_text()) if args.report else measure(args)
    if args.failing:
        saved.write_text(json.dumps(report, indent=2) + "\n")
        for r in report["results"]:
            job = r["failing_job"]
            seconds, memory = job["seconds"], job["peak_rss_mb"]
            print(f"{r['images']:>9} failing: {seconds:.1f} s, peak RSS {memory} MB")
        return
    if args.stages_only:
        saved.write_text(json.dumps(report, indent=2) + "\n")
        for r in report["results"]:
            print(
                f"{r['images']:>9} images: "
                + ", ".join(
                    f"{name} {r[name]['seconds']:.1f} s, {r[name]['peak_rss_mb']['launcher']} MB"
                    for name in ("list_stage", "folder_stage", "glob_stage")
                )
            )
        return
    report["growth"] = growth(report["results"])
    saved.write_text(json.dumps(report, indent=2) + "\n")
    results = report["results"]
    plot(results, report["growth"], RESULTS / f"{args.name}.png")
    first = results[0]
    for r in results:
        ratio = r["images"] / first["images"]
        job = r["job"]
        print(
            f"{r['images']:>9} images: job {job['seconds']:8.1f} s "
            f"({job['seconds'] / first['job']['seconds'] / ratio:.2f}x linear), "
            f"{job['cpu_ms_per_image']:.3f} CPU ms/image, peak RSS {job['peak_rss_mb']} MB; "
            f"join {r['join']['seconds']:.1f} s; list {r['list_stage']['seconds']:.1f} s, "
            f"folder {r['folder_stage']['seconds']:.1f} s"
        )
    for row in report["growth"]:
        print(
            f"{row['from']:>9} -> {row['to']:>9}: {row['wall_ms_per_added_image']:.3f} wall ms and "
            f"{row['cpu_ms_per_added_image']:.3f} CPU ms per added image; "
            f"peak RSS x{row['peak_rss_ratio']}"
        )
    print(f"results: {RESULTS / args.name}.json and .png")


def measure(args: argparse.Namespace) -> dict:
    from captionflow.tiny_models import build_tiny_models

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = build_tiny_models(str(work / "models"))
    pool = pool_images(work / "pool")
    started = time.perf_counter()
    if args.failing:
        results = [failing_job(size, pool, work, models, args.workers) for size in args.sizes]
    else:
        results = [
            one_size(size, pool, work, models, args.workers, args.stages_only)
            for size in args.sizes
        ]
    RESULTS.mkdir(exist_ok=True)
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "workers": args.workers,
        "checkpoint_every": CHECKPOINT_EVERY,
        "results": results,
        "benchmark_seconds": round(time.perf_counter() - started),
    }


if __name__ == "__main__":
    main()
