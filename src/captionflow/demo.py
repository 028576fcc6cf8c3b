"""`make demo`: the whole pipeline, fully offline, on tiny random models.

It proves the install and the flow end to end; the captions are noise, since the models are
random. For real captions run `make run-local` (needs the Hugging Face Hub or local models).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from captionflow.cli import main as cli_main
from captionflow.tiny_models import build_tiny_models

BANNER = """
============================================================================
 captionflow demo: tiny RANDOM models, so the captions below are noise.
 This proves the install and the pipeline; `make run-local` uses real BLIP/CLIP.
============================================================================"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    source = argv[0] if argv else "examples/dataset.txt"
    output = argv[1] if len(argv) > 1 else "out/demo"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as models:
        blip, clip = build_tiny_models(models)
        code = cli_main(
            [
                "run",
                "--input",
                source,
                "--output",
                output,
                "--captioner",
                f"blip:{blip}",
                "--ranker",
                f"clip:{clip}",
                "--report",
                *argv[2:],
            ]
        )
    if code == 0:
        print(BANNER)
        with open(os.path.join(output, "metadata.jsonl"), encoding="utf-8") as metadata:
            for line in metadata:
                row = json.loads(line)
                print(f"  {os.path.basename(row['file_name'])}: {row['text'][:90]}")
        print(f"\nwritten: {output}/metadata.jsonl, errors.jsonl and summary.json")
        print(f"report:  {os.path.abspath(os.path.join(output, 'report', 'index.html'))}")
    return code


if __name__ == "__main__":
    sys.exit(main())
