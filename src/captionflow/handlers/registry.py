"""Captioners and rankers by name, so that a new one plugs in without touching the transforms.

A model reference on the command line is `NAME`, `NAME:MODEL` or just `MODEL`, where MODEL is a
hub id, a local directory or a remote URI, and NAME a registered handler (the default one of its
role when omitted): `blip`, `blip:/models/blip-large`, `Salesforce/blip-image-captioning-large`.

Handlers register with `register_captioner`/`register_ranker`, or, from another package,
through the entry point groups `captionflow.captioners` and `captionflow.rankers` (each entry
names a handler class): installing the package makes the name work everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

from captionflow.handlers.base import CaptionModelHandler, RankModelHandler

logger = logging.getLogger(__name__)

CAPTIONERS: dict[str, type[CaptionModelHandler]] = {}
RANKERS: dict[str, type[RankModelHandler]] = {}
DEFAULT_CAPTIONER = "blip"
DEFAULT_RANKER = "clip"
PLUGIN_GROUPS = {"captionflow.captioners": CAPTIONERS, "captionflow.rankers": RANKERS}
# Built-in handlers that this environment cannot import (an older transformers), with why.
UNAVAILABLE: dict[str, str] = {}
_plugins_loaded = False

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


def unavailable(role: str, name: str, error: Exception) -> None:
    """Record that the built-in `role` `name` cannot be imported here, and why."""
    import transformers

    UNAVAILABLE[name] = (
        f"the {role} {name!r} is not available with transformers {transformers.__version__} "
        f"({type(error).__name__}: {error})"
    )
    logger.debug(UNAVAILABLE[name])


def captioners() -> dict[str, type[CaptionModelHandler]]:
    """Every captioner by name: built in, registered, and installed plug-ins."""
    load_plugins()
    return CAPTIONERS


def rankers() -> dict[str, type[RankModelHandler]]:
    """Every ranker by name: built in, registered, and installed plug-ins."""
    load_plugins()
    return RANKERS


def load_plugins() -> None:
    """Add the handlers that installed packages declare as entry points, once per process. A
    plug-in that fails to load, or names a taken name or a class of the wrong role, is left
    out with a warning: it must not break the handlers that work."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    roles = {"captionflow.captioners": CaptionModelHandler, "captionflow.rankers": RankModelHandler}
    for group, table in PLUGIN_GROUPS.items():
        for entry in entry_points(group=group):
            if entry.name in table:
                logger.warning("plug-in %s (%s): the name is taken", entry.name, entry.value)
                continue
            try:
                handler = entry.load()
            except Exception as error:
                logger.warning("plug-in %s (%s) failed to load: %s", entry.name, entry.value, error)
                continue
            if not (isinstance(handler, type) and issubclass(handler, roles[group])):
                logger.warning(
                    "plug-in %s (%s) is not a %s subclass", entry.name, entry.value, roles[group]
                )
                continue
            table[entry.name] = handler


def parse_reference(reference: str, table: dict[str, Any], default: str) -> tuple[str, str | None]:
    """`(handler name, model or None for its default)` from a command-line reference."""
    name, sep, model = reference.partition(":")
    if name in table:
        return name, (model or None) if sep else None
    if name in UNAVAILABLE:
        raise ValueError(UNAVAILABLE[name])
    return default, reference


def captioner_handler(reference: str = DEFAULT_CAPTIONER, **options: Any) -> CaptionModelHandler:
    """A captioner handler from a reference such as `blip` or `blip:/models/blip`."""
    table = captioners()
    name, model = parse_reference(reference, table, DEFAULT_CAPTIONER)
    return table[name](model, **options)


def ranker_handler(reference: str = DEFAULT_RANKER, **options: Any) -> RankModelHandler:
    """A ranker handler from a reference such as `clip` or `clip:gs://bucket/clip`."""
    table = rankers()
    name, model = parse_reference(reference, table, DEFAULT_RANKER)
    return table[name](model, **options)
