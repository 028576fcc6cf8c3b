"""The LAVIS backend's cost on this machine (run in its environment: `make bench-lavis`):
full-size random weights of LAVIS's BLIP `base_coco` and CLIP ViT-B/32, K sampled candidates.

    .venv-lavis/bin/python -m benchmarks.lavis [--images 4] [--k 5]

One call after a warm-up, in one run: seconds per image to caption, ms per image to rank.
Writes `benchmarks/results/lavis.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

# Offline, LAVIS's BLIP needs a bert-base-uncased tokenizer: the tests' stand-in (random
# weights make its words irrelevant); a real one already in the cache is left alone.
os.environ.setdefault("HF_HOME", os.path.join(tempfile.gettempdir(), "captionflow-lavis-hf"))
from tests_lavis import standin_vocab

standin_vocab.write(os.environ["HF_HOME"])

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from captionflow.handlers.decoding import DecodingOptions  # noqa: E402
from captionflow.handlers.lavis import LavisBlipCaptionHandler, LavisClipRankHandler  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "lavis.json"


def timed(call, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = call(*args)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
        for _ in range(args.images)
    ]
    decoding = DecodingOptions(num_captions=args.k, min_new_tokens=5, max_new_tokens=20, seed=0)
    captioner = LavisBlipCaptionHandler("base_coco:random", decoding=decoding).load_model()
    captioner.caption(pictures[:1])  # warm-up
    caption_seconds, candidates = timed(captioner.caption, pictures)
    ranker = LavisClipRankHandler("ViT-B-32:random").load_model()
    ranker.rank(pictures[:1], candidates[:1])
    rank_seconds, _ = timed(ranker.rank, pictures, candidates)
    report = {
        "torch_threads": torch.get_num_threads(),
        "images": args.images,
        "k": args.k,
        "max_new_tokens": 20,
        "lavis_blip_base_coco_seconds_per_image": caption_seconds / args.images,
        "lavis_clip_vit_b32_ms_per_image": 1000 * rank_seconds / args.images,
        "candidates_per_image": sum(map(len, candidates)) / len(candidates),
    }
    print(json.dumps(report, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
