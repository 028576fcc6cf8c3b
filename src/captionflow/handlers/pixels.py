"""A model's images to its `pixel_values`: uint8 views on the CPU, arithmetic on the device.

Hugging Face's PIL image processors resize, rescale and normalise on the CPU, in float, one
image at a time. `views.py` makes the same resized uint8 views (within two uint8 levels of
the processors' output, tested) and normalises the stacked batch where the model runs: far less
CPU per image, and a quarter of the bytes copied to a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from captionflow.handlers.loading import localize
from captionflow.views import (
    ImageViews,
    ViewBatch,
    ViewSpec,
    make_view,
    normalize,
    to_device,
    view_spec_from_processor,
)

logger = logging.getLogger(__name__)


class PixelValues:
    """`pixel_values(images, device, dtype)` for one model, made as its image processor makes
    them; a processor that `views.py` cannot describe is used as it is."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor
        self.spec: ViewSpec | None
        try:
            self.spec = view_spec_from_processor(image_processor)
        except ValueError as error:
            self.spec = None
            logger.info("using %s as it is: %s", type(image_processor).__name__, error)

    def __call__(
        self,
        images: Sequence[Image.Image | ImageViews] | ViewBatch,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Decoded images, the views the decode step made (`ImageViews`), or those views
        already stacked (`ViewBatch`, possibly on the device), as this model's `pixel_values`
        on `device`."""
        if isinstance(images, ViewBatch):
            if self.spec is None or self.spec not in images.views:
                raise ValueError(f"the decode step made no view of {self.spec} for this model")
            batch = images.views[self.spec]
        elif self.spec is None:
            pixels = self.image_processor(images=[_rgb(i) for i in images], return_tensors="pt")
            return pixels["pixel_values"].to(device, dtype)
        else:
            batch = torch.from_numpy(np.stack([self._view(image) for image in images]))
        return normalize(to_device(batch, device), self.spec, dtype)

    def _view(self, image: Image.Image | ImageViews) -> np.ndarray:
        assert self.spec is not None
        if not isinstance(image, ImageViews):
            return make_view(_rgb(image), self.spec)
        if self.spec not in image.views:
            raise ValueError(f"the decode step made no view of {self.spec} for this model")
        return image.views[self.spec]


def _rgb(image: Image.Image | ImageViews) -> Image.Image:
    if isinstance(image, ImageViews):
        raise ValueError("views from the decode step, but this model takes decoded images")
    return image if image.mode == "RGB" else image.convert("RGB")


def view_spec_of(
    model: str, processor_class: Any, *, trust_remote_code: bool = False
) -> ViewSpec | None:
    """The view a model's images become, read from its processor's config alone (the model is
    not loaded); None when it cannot be had or described (the model then takes pictures)."""
    try:
        processor = processor_class.from_pretrained(
            localize(model), trust_remote_code=trust_remote_code
        )
        return view_spec_from_processor(processor.image_processor)
    except Exception as error:
        logger.info("no view for %s (%s); its images travel decoded", model, error)
        return None
