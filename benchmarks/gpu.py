"""PLACEHOLDER for `python -m benchmarks.gpu`, which another change is writing (issue 9): replace
this file with it. It only proves that `benchmarks/gpu.sh` set the box up: it imports Beam,
pydantic, captionflow, transformers and torch, runs a small Beam pipeline and the caption pipeline
on tiny random models (on the GPU where there is one), and prints a short table last.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    import apache_beam as beam
    import pydantic
    import torch
    import transformers
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to

    import captionflow
    from benchmarks.bench import make_images
    from captionflow.config import RunConfig
    from captionflow.pipelines import build_caption_pipeline
    from captionflow.tiny_models import build_tiny_models

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [
        ("python", platform.python_version(), sys.executable),
        ("torch", torch.__version__, torch.cuda.get_device_name(0) if device == "cuda" else "cpu"),
        ("transformers", transformers.__version__, Path(transformers.__file__).parent),
        ("apache_beam", beam.__version__, Path(beam.__file__).parent),
        ("pydantic", pydantic.VERSION, Path(pydantic.__file__).parent),
        ("captionflow", captionflow.__version__, Path(captionflow.__file__).parent),
    ]

    started = time.perf_counter()
    options = PipelineOptions(["--runner=FnApiRunner"])
    with beam.Pipeline(options=options) as pipeline:
        total = (
            pipeline
            | beam.Create(range(1000))
            | beam.Map(lambda x: x * x)
            | beam.CombineGlobally(sum)
        )
        assert_that(total, equal_to([sum(x * x for x in range(1000))]))
    rows.append(("beam pipeline", "ok", f"FnApiRunner, {time.perf_counter() - started:.1f} s"))

    with tempfile.TemporaryDirectory() as work:
        blip, clip = build_tiny_models(str(Path(work, "models")))
        uris = make_images(Path(work, "images"), 8)
        Path(work, "dataset.txt").write_text("\n".join(uris) + "\n")
        config = RunConfig(
            input=str(Path(work, "dataset.txt")),
            output=str(Path(work, "out")),
            captioner=f"blip:{blip}",
            ranker=f"clip:{clip}",
            device=device,
        )
        started = time.perf_counter()
        with beam.Pipeline(options=options) as pipeline:
            build_caption_pipeline(pipeline, config)
        lines = Path(work, "out", "metadata.jsonl").read_text().splitlines()
        first = json.loads(lines[0])["text"] if lines else "-"
        rows.append(
            (
                "caption pipeline",
                f"{len(lines)}/8 images",
                f"tiny models on {device}, {time.perf_counter() - started:.1f} s: {first[:30]!r}",
            )
        )

    print("\nbenchmarks.gpu PLACEHOLDER (the real benchmark replaces this file)")
    print(f"{'what':<18} {'version / result':<22} where")
    for name, value, where in rows:
        print(f"{name:<18} {value!s:<22} {where}")


if __name__ == "__main__":
    main()
