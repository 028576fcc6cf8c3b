"""Each captioner's cost on this machine: full-size random weights of its default checkpoint's
architecture (or the one named), K sampled candidates per image.

    python -m benchmarks.captioners [--images 4] [--k 5] [--only florence2,vlm]

The models are built in memory (no files: BLIP-2 alone is 15 GB in float32) and given the
decode step's views, or decoded pictures for `vlm`; one `caption` call after a warm-up, in one
run: seconds per image and the ratio to BLIP-base. Writes `benchmarks/results/captioners.json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    BartConfig,
    BartTokenizerFast,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    CLIPImageProcessorPil,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    Florence2VisionConfig,
    GPT2TokenizerFast,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    OPTConfig,
    Qwen2Config,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from benchmarks.models import _blip_base_parts
from captionflow.handlers.blip import BlipCaptioner
from captionflow.handlers.blip2 import Blip2Captioner
from captionflow.handlers.decoding import DecodingOptions
from captionflow.handlers.florence2 import Florence2Captioner
from captionflow.handlers.vlm import VlmCaptioner
from captionflow.views import ImageViews, make_view

RESULTS = Path(__file__).parent / "results" / "captioners.json"
LLAVA_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>\n"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_bpe(cls: Any, size: int, specials: list[str], **kwargs: Any) -> Any:
    """A byte-level BPE tokenizer with `size` tokens: real specials, letters, then filler."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    base = [*specials, *letters, *("\u0120" + c for c in letters), "\u0120", "\u010a", ".", ":"]
    vocab = {token: i for i, token in enumerate(base + [f"w{i}" for i in range(size - len(base))])}
    return cls(vocab=vocab, merges=[], **kwargs), vocab


def blip_base(decoding: DecodingOptions) -> Any:
    config, processor = _blip_base_parts(None)
    return BlipCaptioner(BlipForConditionalGeneration(config), processor, decoding)


def blip2_opt_27b(decoding: DecodingOptions) -> Any:
    tokenizer, vocab = byte_bpe(
        GPT2TokenizerFast,
        50272,
        ["<pad>", "</s>", "<unk>", "<image>"],
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    text = OPTConfig(
        vocab_size=50272,
        hidden_size=2560,
        ffn_dim=10240,
        num_hidden_layers=32,
        num_attention_heads=32,
        word_embed_proj_dim=2560,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["</s>"],
        eos_token_id=vocab["</s>"],
    )
    config = Blip2Config(
        text_config=text.to_dict(), num_query_tokens=32, image_token_index=vocab["<image>"]
    )
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": 224, "width": 224}),
        tokenizer=tokenizer,
        num_query_tokens=32,
    )
    return Blip2Captioner(Blip2ForConditionalGeneration(config), processor, decoding)


def florence2_base(decoding: DecodingOptions) -> Any:
    tokenizer, vocab = byte_bpe(
        BartTokenizerFast,
        51289,
        ["<s>", "<pad>", "</s>", "<unk>", "<image>"],
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessorPil(
        size={"height": 768, "width": 768}, do_center_crop=False
    )
    image_processor.image_seq_length = 577
    text = BartConfig(
        vocab_size=51289,
        d_model=768,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
        max_position_embeddings=1024,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        decoder_start_token_id=vocab["</s>"],
        forced_bos_token_id=vocab["<s>"],
    )
    config = Florence2Config(
        vision_config=Florence2VisionConfig(projection_dim=768, drop_path_rate=0.0),
        text_config=text,
        image_token_id=vocab["<image>"],
    )
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    return Florence2Captioner(Florence2ForConditionalGeneration(config), processor, decoding)


def llava_qwen_05b(decoding: DecodingOptions) -> Any:
    """llava-interleave-qwen-0.5b: SigLIP-so400m at 384 px (729 image tokens), Qwen2-0.5B."""
    tokenizer, vocab = byte_bpe(
        GPT2TokenizerFast,
        151646,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>"},
    )
    vision = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
    )
    text = Qwen2Config(
        vocab_size=151646,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        pad_token_id=vocab["<|endoftext|>"],
        eos_token_id=vocab["<|im_end|>"],
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab["<image>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": 384, "width": 384}),
        tokenizer=tokenizer,
        chat_template=LLAVA_TEMPLATE,
        patch_size=14,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
    )
    return VlmCaptioner(LlavaForConditionalGeneration(config), processor, decoding)


def llava_qwen_05b_generate(decoding: DecodingOptions) -> Any:
    """The same VLM through `generate` alone: its prompt run once per candidate."""
    captioner = llava_qwen_05b(decoding)
    captioner.shares_prompt = False
    return captioner


CAPTIONERS: dict[str, tuple[str, Callable[[DecodingOptions], Any]]] = {
    "blip": ("Salesforce/blip-image-captioning-base", blip_base),
    "florence2": ("florence-community/Florence-2-base", florence2_base),
    "vlm": ("llava-hf/llava-interleave-qwen-0.5b-hf", llava_qwen_05b),
    "vlm-generate": ("llava-hf/llava-interleave-qwen-0.5b-hf", llava_qwen_05b_generate),
    "blip2": ("Salesforce/blip2-opt-2.7b", blip2_opt_27b),
}


def inputs(captioner: Any, pictures: list[Image.Image]) -> list:
    spec = getattr(captioner, "pixel_values", None) and captioner.pixel_values.spec
    if spec is None:
        return pictures
    return [ImageViews(p.size, {spec: make_view(p, spec)}) for p in pictures]


def measure(name: str, pictures: list[Image.Image], decoding: DecodingOptions) -> dict:
    architecture, build = CAPTIONERS[name]
    torch.manual_seed(0)
    started = time.perf_counter()
    captioner = build(decoding)
    built = time.perf_counter() - started
    images = inputs(captioner, pictures)
    captioner.caption(images[:1])  # warm-up
    started = time.perf_counter()
    candidates = captioner.caption(images)
    seconds = time.perf_counter() - started
    parameters = sum(p.numel() for p in captioner.model.parameters())
    del captioner
    gc.collect()
    return {
        "captioner": name,
        "architecture": architecture,
        "parameters_millions": round(parameters / 1e6),
        "images": len(images),
        "candidates_per_image": sum(map(len, candidates)) / len(candidates),
        "seconds_per_image": seconds / len(images),
        "build_seconds": built,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--only", default=",".join(CAPTIONERS))
    args = parser.parse_args()
    decoding = DecodingOptions(num_captions=args.k, min_new_tokens=5, max_new_tokens=20, seed=0)
    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
        for _ in range(args.images)
    ]
    rows = []
    for name in args.only.split(","):
        rows.append(measure(name, pictures, decoding))
        row = rows[-1]
        print(
            f"{name:10} {row['parameters_millions']:6}M params "
            f"{row['seconds_per_image']:7.2f} s/image",
            flush=True,
        )
    base = next((r["seconds_per_image"] for r in rows if r["captioner"] == "blip"), None)
    for row in rows:
        row["vs_blip"] = row["seconds_per_image"] / base if base else None
    report = {
        "torch_threads": torch.get_num_threads(),
        "k": args.k,
        "max_new_tokens": 20,
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
