"""Captioners and rankers by name, so that a new one plugs in without touching the transforms.

A model reference on the command line is `NAME`, `NAME:MODEL` or just `MODEL`, where MODEL is a
hub id, a local directory or a remote URI, and NAME a registered handler (the default one of its
role when omitted): `blip`, `blip:/models/blip-large`, `Salesforce/blip-image-captioning-large`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from captionflow.handlers.base import CaptionModelHandler, RankModelHandler

CAPTIONERS: dict[str, type[CaptionModelHandler]] = {}
RANKERS: dict[str, type[RankModelHandler]] = {}
DEFAULT_CAPTIONER = "blip"
DEFAULT_RANKER = "clip"

H = TypeVar("H")


def _register(table: dict[str, Any], name: str) -> Callable[[H], H]:
    def add(cls: H) -> H:
        table[name] = cls
        return cls

    return add


def register_captioner(name: str) -> Callable[[H], H]:
    """Class decorator: make a `CaptionModelHandler` subclass available as `--captioner NAME`."""
    return _register(CAPTIONERS, name)


def register_ranker(name: str) -> Callable[[H], H]:
    """Class decorator: make a `RankModelHandler` subclass available as `--ranker NAME`."""
    return _register(RANKERS, name)


def parse_reference(reference: str, table: dict[str, Any], default: str) -> tuple[str, str | None]:
    """`(handler name, model or None for its default)` from a command-line reference."""
    name, sep, model = reference.partition(":")
    if name in table:
        return name, (model or None) if sep else None
    return default, reference


def captioner_handler(reference: str = DEFAULT_CAPTIONER, **options: Any) -> CaptionModelHandler:
    """A captioner handler from a reference such as `blip` or `blip:/models/blip`."""
    name, model = parse_reference(reference, CAPTIONERS, DEFAULT_CAPTIONER)
    return CAPTIONERS[name](model, **options)


def ranker_handler(reference: str = DEFAULT_RANKER, **options: Any) -> RankModelHandler:
    """A ranker handler from a reference such as `clip` or `clip:gs://bucket/clip`."""
    name, model = parse_reference(reference, RANKERS, DEFAULT_RANKER)
    return RANKERS[name](model, **options)
