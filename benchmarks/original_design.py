"""The original tool's design, rebuilt on our models for a fair comparison.

Batch size 1; each image repeated K times through the vision encoder (one caption per copy);
decoded images joined back to their captions with CoGroupByKey, so they go through a shuffle.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from captionflow.handlers import BlipCaptioner, ClipRanker, DecodingOptions
from captionflow.handlers.blip import PROMPT
from captionflow.images import decode_image


def read_and_decode(uri: str) -> tuple[str, Image.Image]:
    with FileSystems.open(uri) as file:
        return uri, decode_image(file.read())


class CaptionOneImageAtATime(beam.DoFn):
    def __init__(self, model: str, decoding: DecodingOptions, device: str) -> None:
        self.model, self.decoding, self.device = model, decoding, device

    def setup(self) -> None:
        self.blip = BlipCaptioner.from_pretrained(
            self.model, decoding=self.decoding, device=self.device
        )

    def process(self, element: tuple[str, Image.Image]) -> Iterator[tuple[str, list[str]]]:
        uri, image = element
        k, blip = self.decoding.num_captions, self.blip
        inputs = blip.processor(
            images=[image] * k, text=[self.decoding.prompt_or(PROMPT)] * k, return_tensors="pt"
        ).to(blip.model.device)
        settings = self.decoding.generate_kwargs() | {"num_return_sequences": 1}
        ids = blip.model.generate(
            pixel_values=inputs["pixel_values"].to(blip.model.dtype),
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            **settings,
        )
        yield uri, blip.processor.batch_decode(ids, skip_special_tokens=True)


class RankOneImageAtATime(beam.DoFn):
    def __init__(self, model: str, device: str) -> None:
        self.model, self.device = model, device

    def setup(self) -> None:
        self.clip = ClipRanker.from_pretrained(self.model, device=self.device)

    def process(self, joined: tuple[str, dict]) -> Iterator[str]:
        uri, group = joined
        (image,), (texts,) = group["image"], group["captions"]
        (ranked,) = self.clip.rank([image], [texts])
        yield json.dumps({"file_name": uri, "text": ranked[0].text})


def build_original_pipeline(
    pipeline: beam.Pipeline,
    uris: list[str],
    output: str,
    *,
    blip: str,
    clip: str,
    decoding: DecodingOptions,
    device: str,
) -> None:
    images = pipeline | beam.Create(uris) | beam.Reshuffle() | "Decode" >> beam.Map(read_and_decode)
    captions = images | beam.ParDo(CaptionOneImageAtATime(blip, decoding, device))
    (
        {"image": images, "captions": captions}
        | beam.CoGroupByKey()
        | beam.ParDo(RankOneImageAtATime(clip, device))
        | beam.io.WriteToText(output, file_name_suffix=".jsonl")
    )
