"""BLIP decoding: the fast loop against transformers' `generate`, on full-size random BLIP-base.

    python -m benchmarks.decoding                 # check + captioner rates + whole pipeline (CPU)
    python -m benchmarks.decoding --only check    # token ids only: a few minutes
    python -m benchmarks.decoding --device cuda --rows 160 1280 2560   # ms per decode step

1. check: the same token ids from both decoders (greedy, beam search, seeded sampling), in
   float32 (on a GPU in its dtype too: equal or near-equal, rounding).
2. captioner: images/s of each decoder on the same pixel tensors, K=5 and K=10, the vision
   tower timed apart (it is the same work in both, bar SDPA).
3. pipeline: the whole captionflow pipeline (`--decoder fast`) against a plain transformers
   loop on the same JPEGs and settings: open, processor, `generate(num_return_sequences=K)`,
   CLIP processor and model, best caption kept.
4. steps (GPU): milliseconds per decode step at the given row counts, fast and reference.

Every ratio comes from one run. Results go to benchmarks/results/decoding.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CHECKS = {
    "greedy": {"num_captions": 1, "strategy": "beam", "num_beams": 1},
    "beam 5": {"num_captions": 5, "strategy": "beam", "num_beams": 5},
    "sample K=5": {"num_captions": 5},
    "sample K=10": {"num_captions": 10},
}


def captioners(path: str, device: str, dtype: str, **options: object):
    from captionflow.handlers import BlipCaptioner, DecodingOptions

    fast = BlipCaptioner.from_pretrained(
        path, decoding=DecodingOptions(**options), device=device, dtype=dtype
    )
    reference = BlipCaptioner(
        fast.model, fast.processor, DecodingOptions(**options, decoder="reference")
    )
    return fast, reference


def pixel_batch(images: int, model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    """Random pixel values of the model's input size, device and dtype."""
    size = model.config.vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(images, 3, size, size, generator=generator)
    return pixels.to(model.device, model.dtype)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def check(path: str, device: str, dtype: str, images: int) -> dict:
    """Token ids of both decoders for each setting, same seed."""
    results = {}
    for name, options in CHECKS.items():
        fast, reference = captioners(path, device, dtype, **options)
        pixels = pixel_batch(images, fast.model, seed=len(name))
        torch.manual_seed(7)
        expected = reference.token_ids(pixels)
        torch.manual_seed(7)
        actual = fast.token_ids(pixels)
        same_shape = actual.shape == expected.shape
        equal_rows = int((actual == expected).all(dim=1).sum()) if same_shape else 0
        results[name] = {"rows": expected.shape[0], "identical_rows": equal_rows}
        print(f"  {name:<12} identical rows {equal_rows}/{expected.shape[0]}", flush=True)
    return results


def timed(function, repeat: int) -> float:
    """Seconds per call, best of `repeat` after one untimed call."""
    function()
    best = float("inf")
    for _ in range(repeat):
        sync()
        started = time.perf_counter()
        function()
        sync()
        best = min(best, time.perf_counter() - started)
    return best


def captioner_rates(path: str, device: str, dtype: str, images: int, repeat: int) -> dict:
    from captionflow.handlers import BlipCaptioner, DecodingOptions

    results = {}
    for k in (5, 10):
        fast, reference = captioners(path, device, dtype, num_captions=k)
        compiled = BlipCaptioner(
            fast.model, fast.processor, DecodingOptions(num_captions=k, decoder="compiled")
        )
        pixels = pixel_batch(images, fast.model)
        vision = timed(lambda f=fast, p=pixels: f.fast.encode(p), repeat)
        stock_vision = timed(lambda f=fast, p=pixels: f.model.vision_model(pixel_values=p), repeat)
        seconds = {
            "fast": timed(lambda f=fast, p=pixels: f.token_ids(p), repeat),
            "reference": timed(lambda r=reference, p=pixels: r.token_ids(p), repeat),
            "compiled": timed(lambda c=compiled, p=pixels: c.token_ids(p), repeat),
        }
        row = {
            "images": images,
            "fast_images_per_second": images / seconds["fast"],
            "reference_images_per_second": images / seconds["reference"],
            "fast_vs_reference": seconds["reference"] / seconds["fast"],
            "compiled_images_per_second": images / seconds["compiled"],
            "compiled_vs_fast": seconds["fast"] / seconds["compiled"],
            "vision_sdpa_seconds_per_image": vision / images,
            "vision_stock_seconds_per_image": stock_vision / images,
            "decoding_fast_seconds_per_image": (seconds["fast"] - vision) / images,
            "decoding_reference_seconds_per_image": (seconds["reference"] - stock_vision) / images,
        }
        results[f"K={k}"] = row
        print(
            f"  K={k:<3} fast {row['fast_images_per_second']:.3f} img/s, reference "
            f"{row['reference_images_per_second']:.3f} img/s: {row['fast_vs_reference']:.2f}x; "
            f"vision {vision / images:.3f} s/img (stock {stock_vision / images:.3f}), decoding "
            f"{row['decoding_fast_seconds_per_image']:.3f} vs "
            f"{row['decoding_reference_seconds_per_image']:.3f} s/img; compiled "
            f"{row['compiled_images_per_second']:.3f} img/s ({row['compiled_vs_fast']:.2f}x fast)",
            flush=True,
        )
    return results


def step_times(
    path: str, device: str, dtype: str, rows: list[int], k: int = 5, compiled: bool = True
) -> dict:
    """Milliseconds per decode step (prompt done, 10 tokens in): the fast loop eager, its
    compiled step (CUDA graphs on a GPU; compile time reported apart) and `generate`'s forward.
    None where one failed (`generate`'s K copies of the image keys may not fit the device)."""
    from captionflow.handlers.blip_fast import FastBlip

    fast, _ = captioners(path, device, dtype, num_captions=k)
    model = fast.model
    prompt = torch.tensor(fast._prompt_ids, device=device)
    word = min(1000, model.config.text_config.vocab_size - 1)
    results = {}
    for count in rows:
        images = count // k
        tokens = torch.full((images * k,), word, device=device)
        point: dict = {}
        loops = {"fast": fast.fast}
        if compiled:
            loops["compiled"] = FastBlip(model, compiled=True)
        for name, blip in loops.items():
            skips = cudagraph_skips()
            try:
                point[f"{name}_ms"], warmup = fast_step_seconds(blip, images, k, prompt, tokens)
                point[f"{name}_ms"] *= 1000
                point[f"{name}_first_steps_s"] = warmup
                if name == "compiled" and blip.compiled_step is None:
                    point["compiled_ms"] = None  # it fell back to the eager step: not a figure
                if name == "compiled":  # on a GPU, 0 if its steps ran as CUDA graphs
                    point["compiled_cudagraph_skips"] = cudagraph_skips() - skips
            except Exception as error:
                print(f"  {name} at {count} rows: {type(error).__name__}: {error}"[:300])
                point[f"{name}_ms"] = None
        embeds = fast.fast.encode(pixel_batch(images, model))
        try:
            point["reference_ms"] = 1000 * reference_step_seconds(model, embeds, k, prompt, tokens)
        except Exception as error:  # out of memory, or another transformers' cache API
            print(f"  generate's forward at {count} rows: {type(error).__name__}: {error}"[:300])
            point["reference_ms"] = None
        del embeds
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results[count] = point
        shown = ", ".join(f"{name} {milliseconds(point, name)}" for name in loops)
        print(f"  {count:>5} rows: {shown}, generate {milliseconds(point, 'reference')}")
    return results


def cudagraph_skips() -> int:
    """How many times torch.compile declined to run a function as a CUDA graph so far."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def milliseconds(point: dict, name: str) -> str:
    value = point.get(f"{name}_ms")
    return "failed" if value is None else f"{value:.2f} ms"


def fast_step_seconds(blip, images: int, k: int, prompt: torch.Tensor, tokens: torch.Tensor):
    """Seconds per step of `blip`'s loop, and the seconds its first 10 steps took (compiling)."""
    embeds = blip.encode(pixel_batch(images, blip.model))
    steps = blip.steps(embeds, k, max_length=len(prompt) + 30)
    steps.prefill(prompt)
    sync()
    started = time.perf_counter()
    for _ in range(10):
        steps.step(tokens)
    sync()
    warmup = time.perf_counter() - started
    start = steps.length

    def one() -> None:
        steps.length = start
        steps.step(tokens)

    return timed(one, 5), warmup


def reference_step_seconds(model, embeds, k, prompt, tokens) -> float:
    """One step of `generate`'s loop: the decoder's forward with its dynamic cache and K copies
    of each image's embeddings, 10 tokens in."""
    from transformers import DynamicCache, EncoderDecoderCache

    text = model.text_decoder
    config = text.config
    expanded = embeds.repeat_interleave(k, dim=0)
    mask = torch.ones(expanded.shape[:2], dtype=torch.long, device=expanded.device)
    ids = torch.cat([prompt, tokens[:1].repeat(10)]).expand(len(tokens), -1)
    with torch.inference_mode():
        cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
        text(
            input_ids=ids,
            encoder_hidden_states=expanded,
            encoder_attention_mask=mask,
            cache=cache,
            use_cache=True,
        )

        def one() -> None:
            text(
                input_ids=tokens[:, None],
                encoder_hidden_states=expanded,
                encoder_attention_mask=mask,
                cache=cache,
                use_cache=True,
            )
            cache.self_attention_cache.crop(-1)

        return timed(one, 5)


def pipeline_vs_plain_loop(
    path: str, clip: str, device: str, k: int, images: int, batch: int
) -> dict:
    """The whole pipeline and a plain transformers loop on the same files, in child processes."""
    from benchmarks.bench import make_images

    work = Path(tempfile.mkdtemp(prefix="captionflow-decoding-"))
    uris = make_images(work / "images", images)
    list_file = work / "dataset.txt"
    list_file.write_text("\n".join(uris) + "\n")
    results = {}
    for kind in ("plain", "pipeline"):
        argv = [sys.executable, "-m", "benchmarks.decoding", "--child", kind, "--blip", path]
        argv += ["--clip", clip, "--device", device, "--k", str(k), "--list-file", str(list_file)]
        argv += ["--batch", str(batch), "--output", str(work / kind)]
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{kind} failed:\n{done.stderr[-4000:]}")
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {kind:<9} {results[kind]['images_per_second']:.3f} img/s", flush=True)
    results["pipeline_vs_plain"] = (
        results["pipeline"]["images_per_second"] / results["plain"]["images_per_second"]
    )
    print(f"  pipeline / plain transformers loop: {results['pipeline_vs_plain']:.2f}x")
    return results


def child_plain(args: argparse.Namespace) -> dict:
    """What a user writes with transformers alone."""
    from PIL import Image
    from transformers import (
        BlipForConditionalGeneration,
        BlipProcessor,
        CLIPModel,
        CLIPProcessor,
    )

    from captionflow.handlers import DecodingOptions
    from captionflow.handlers.blip import PROMPT

    uris = Path(args.list_file).read_text().split()
    blip = BlipForConditionalGeneration.from_pretrained(args.blip).to(args.device).eval()
    blip_processor = BlipProcessor.from_pretrained(args.blip)
    clip = CLIPModel.from_pretrained(args.clip).to(args.device).eval()
    clip_processor = CLIPProcessor.from_pretrained(args.clip)
    settings = DecodingOptions(num_captions=args.k)
    started = time.perf_counter()
    best = []
    with torch.inference_mode():
        for i in range(0, len(uris), args.batch):
            pictures = [Image.open(uri).convert("RGB") for uri in uris[i : i + args.batch]]
            inputs = blip_processor(
                images=pictures,
                text=[settings.prompt_or(PROMPT)] * len(pictures),
                return_tensors="pt",
            ).to(args.device)
            ids = blip.generate(**inputs, **settings.generate_kwargs())
            texts = blip_processor.batch_decode(ids, skip_special_tokens=True)
            for j, picture in enumerate(pictures):
                candidates = texts[j * args.k : (j + 1) * args.k]
                scored = clip_processor(
                    text=candidates,
                    images=picture,
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                ).to(args.device)
                scores = clip(**scored).logits_per_image[0]
                best.append(candidates[int(scores.argmax())])
    seconds = time.perf_counter() - started
    return {"images": len(best), "seconds": seconds, "images_per_second": len(best) / seconds}


def child_pipeline(args: argparse.Namespace) -> dict:
    """The captionflow pipeline on the same files (`benchmarks.bench`'s run of it)."""
    from benchmarks.bench import child_ours
    from captionflow.handlers import ClipRankHandler

    rank_batch = ClipRankHandler.batch_size  # the CLI's default for clip
    settings = vars(args) | {"caption_batch": args.batch, "rank_batch": rank_batch}
    result = child_ours(argparse.Namespace(**settings))
    return result | {"images_per_second": result["images"] / result["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", choices=("check", "captioner", "pipeline", "steps"), action="append"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", type=int, help="transformer layers (default: full, 12)")
    parser.add_argument("--images", type=int, default=4, help="images per captioner batch")
    parser.add_argument("--pipeline-images", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="*", default=[160, 1280, 2560])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "decoding.json"))
    parser.add_argument("--child", choices=("plain", "pipeline"), help=argparse.SUPPRESS)
    for hidden in ("--blip", "--clip", "--list-file", "--output"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child = child_plain if args.child == "plain" else child_pipeline
        print(json.dumps(child(args)))
        return

    from benchmarks.bench import machine
    from benchmarks.models import build_blip_base, build_clip_b32

    parts = args.only or (
        ["check", "captioner", "steps"]
        if args.device == "cuda"
        else ["check", "captioner", "pipeline"]
    )
    work = Path(tempfile.mkdtemp(prefix="captionflow-decoding-"))
    blip = build_blip_base(str(work / "blip"), layers=args.layers)
    results: dict = {"machine": machine(), "settings": vars(args) | {"parts": parts}}
    if "check" in parts:
        print("same token ids, float32:")
        results["check"] = check(blip, args.device, "float32", images=2)
        if args.dtype != "float32":
            print(f"same token ids, {args.dtype}:")
            results[f"check_{args.dtype}"] = check(blip, args.device, args.dtype, images=2)
    if "captioner" in parts:
        print(f"captioner, {args.images} images a batch, {args.dtype}:")
        results["captioner"] = captioner_rates(
            blip, args.device, args.dtype, args.images, args.repeat
        )
    if "steps" in parts:
        print("decode steps:")
        results["steps"] = step_times(blip, args.device, args.dtype, args.rows)
    if "pipeline" in parts:
        clip = build_clip_b32(str(work / "clip"), layers=args.layers)
        print(f"whole pipeline vs plain transformers loop, {args.pipeline_images} images, K=5:")
        results["pipeline"] = pipeline_vs_plain_loop(
            blip, clip, args.device, 5, args.pipeline_images, batch=8
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
