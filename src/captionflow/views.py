"""Model-ready image views: each model's fixed-size input, made once from the decoded image.

A Hugging Face image processor resizes, crops, rescales and normalises every image inside the
model call, in float32 NumPy, on the CPU that should be feeding the GPU. Here the same work is
split where it is cheapest:

- `make_view` (CPU, where the image is decoded): the resize and crop, in uint8. Bilinear and
  bicubic resizes run on torch's antialiased uint8 kernels, built to match Pillow's and four
  times cheaper here; Pillow's other filters stay Pillow's. A view is a few hundred kB of uint8
  that can be stacked and shipped to the device as is.
- `normalize` (on the device, per batch): rescale and normalise to the model's dtype.

`view_spec_from_processor` reads a processor's own settings, so any checkpoint's sizes, crop and
filter apply. The result matches the processor's `pixel_values`: the arithmetic bit for bit;
torch's fixed-point weights round a value one uint8 level off now and then, two levels rarely
(`tests/test_views.py` asserts how rarely). `ViewSpec.min_source_size` says how small a JPEG
may be decoded (draft mode) and still give the same views.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from captionflow.images import shown_size

__all__ = [
    "ImageViews",
    "StackSpace",
    "ViewBatch",
    "ViewSpec",
    "covering_size",
    "make_view",
    "make_views",
    "normalize",
    "view_spec_from_processor",
]

Resize = Literal["squash", "shortest_edge", "none"]

# Where the methods of a stock processor pipeline live: a processor class that overrides one of
# them elsewhere (patching, tiling, custom resizing) does something a ViewSpec cannot describe.
_PIPELINE_METHODS = (
    "preprocess",
    "_preprocess_image_like_inputs",
    "_prepare_image_like_inputs",
    "process_image",
    "_preprocess",
    "resize",
    "center_crop",
    "rescale",
    "normalize",
)
_STOCK_MODULES = ("transformers.image_processing_utils", "transformers.image_processing_backends")

# The filters torch resizes in uint8 as Pillow does (`antialias=True`: Pillow's kernels, support
# widened when shrinking); the others are Pillow's alone.
_TORCH_FILTERS = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}
# Pillow resizes an image more than this many times taller than wide vertically first.
_PILLOW_TALL = 100


@dataclass(frozen=True)
class ViewSpec:
    """One fixed-size model input: how to cut it from an RGB image, and how to normalise it.

    `resize` is the rule before any crop: `"squash"` to `squash_size` (height, width) whatever
    the aspect (BLIP), `"shortest_edge"` to make the short side `shortest_edge` long, the long
    side in proportion and truncated to an int (CLIP), or `"none"`. With `center_crop` the
    resized image is then centre-cropped (zero-padded where it is smaller) to `size`, the view's
    (height, width). `rescale_factor`, `mean` and `std` are applied later, on the device, by
    `normalize`; `None` skips that step. Frozen and hashable: equal specs can share a view.
    """

    size: tuple[int, int]
    resize: Resize
    resample: Image.Resampling = Image.Resampling.BICUBIC
    squash_size: tuple[int, int] | None = None
    shortest_edge: int | None = None
    center_crop: bool = False
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.resize not in ("squash", "shortest_edge", "none"):
            raise ValueError(f"unknown resize rule {self.resize!r}")
        if self.resize == "squash" and not self.squash_size:
            raise ValueError("a squash resize needs squash_size (height, width)")
        if self.resize == "shortest_edge" and not self.shortest_edge:
            raise ValueError("a shortest_edge resize needs shortest_edge")
        if not self.center_crop and self.resize != "squash":
            raise ValueError(
                f"resize {self.resize!r} without a centre crop gives images of varying size, "
                "which cannot be batched"
            )
        if not self.center_crop and self.squash_size != self.size:
            raise ValueError(f"squash_size {self.squash_size} must be the view's size {self.size}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together")
        if self.mean is not None and not (len(self.mean) == len(self.std or ()) == 3):
            raise ValueError(f"mean and std need 3 values, one per channel: {self.mean} {self.std}")

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of a `width` x `height` image after the resize, before the crop,
        computed as transformers' `get_resize_output_image_size` does (int() truncation)."""
        if self.resize == "squash":
            assert self.squash_size is not None
            return self.squash_size
        if self.resize == "none":
            return height, width
        edge = self.shortest_edge
        assert edge is not None
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(edge * long / short)  # the same float expression, so the same truncation
        return (new_long, edge) if width <= height else (edge, new_long)

    def min_source_size(self) -> tuple[int, int] | None:
        """The least (height, width) an image may be reduced to (a JPEG decoded at a smaller
        scale) and still have the detail this view keeps: a squash's size, or the shortest edge
        both ways (the crop is cut from the resized image, whatever the source's size). None
        where no reduction will do: a crop without a resize keeps the image's own pixels."""
        if self.resize == "squash":
            assert self.squash_size is not None
            return self.squash_size
        if self.resize == "shortest_edge":
            assert self.shortest_edge is not None
            return self.shortest_edge, self.shortest_edge
        return None


def covering_size(specs: Sequence[ViewSpec]) -> tuple[int, int] | None:
    """The smallest (height, width) that still serves every view of `specs`; None when one
    needs the image's own pixels, or there are none."""
    sizes = [spec.min_source_size() for spec in specs]
    known = [size for size in sizes if size is not None]
    if not known or len(known) < len(sizes):
        return None
    return max(height for height, _ in known), max(width for _, width in known)


def make_view(image: Image.Image, spec: ViewSpec) -> np.ndarray:
    """The view of an RGB image: a read-only, C-contiguous (height, width, 3) uint8 array.

    Height x width x channel is Pillow's own layout, so the view costs no transpose on the CPU;
    `normalize` moves the channels first, per batch, on the device.
    """
    return _Source(image).view(spec)


@dataclass(frozen=True, eq=False)
class ImageViews:
    """One decoded image as the views its models take, made once where it was decoded: what
    travels to the models instead of the picture (a few hundred kB of uint8, not megabytes),
    shared by the captioner and the ranker."""

    size: tuple[int, int]  # the decoded image's (width, height)
    views: dict[ViewSpec, np.ndarray]
    shown_size: tuple[int, int] | None = None  # the file's (width, height), upright

    @property
    def original_size(self) -> tuple[int, int]:
        """(width, height) of the image as shown at full size (`images.shown_size`)."""
        return self.shown_size or self.size

    @property
    def nbytes(self) -> int:
        return sum(view.nbytes for view in self.views.values())


def make_views(image: Image.Image, specs: Sequence[ViewSpec]) -> ImageViews:
    """Every distinct view of `image` that `specs` ask for (two models may share one), from one
    copy of its pixels."""
    source = _Source(image)
    views = {spec: source.view(spec) for spec in dict.fromkeys(specs)}
    return ImageViews(image.size, views, shown_size(image))


class _Source:
    """An RGB image to make views of; its pixels as a tensor are copied out of Pillow once, when
    the first view resized by torch needs them."""

    def __init__(self, image: Image.Image) -> None:
        if image.mode != "RGB":
            raise ValueError(f"views are made from RGB images, not {image.mode}")
        self.image = image

    @functools.cached_property
    def pixels(self) -> torch.Tensor:
        """(1, 3, H, W) uint8 in channels-last memory: the (H, W, 3) array seen channels first.
        `unsqueeze` gives the batch dimension a stride of its own, without which torch finds
        the layout ambiguous and returns its result channels first (a transpose more). The
        bytearray, a cheap copy, spares torch's warning about read-only arrays."""
        width, height = self.image.size
        array = np.frombuffer(bytearray(self.image.tobytes()), np.uint8).reshape(height, width, 3)
        return torch.from_numpy(array).unsqueeze(0).permute(0, 3, 1, 2)

    def view(self, spec: ViewSpec) -> np.ndarray:
        """`make_view`'s result: resized, cropped, contiguous and read-only (views are shared)."""
        view = self._resized(spec.resized_size(*self.image.size), spec.resample)
        if spec.center_crop:
            view = _center_crop(view, spec.size)
        view = np.ascontiguousarray(view)
        view.flags.writeable = False
        return view

    def _resized(self, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
        """(H, W, 3) uint8 at `size` (height, width): torch's kernels where they are Pillow's."""
        if resample in _TORCH_FILTERS:
            resized = _resize(self.pixels, size, _TORCH_FILTERS[resample])
            return resized[0].permute(1, 2, 0).numpy()  # channels last: no copy
        height, width = size
        image = self.image
        if (width, height) != image.size:
            image = image.resize((width, height), resample)
        return _array(image)


def _resize(pixels: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Pillow's two-pass resize on torch's uint8 kernels, one pass (one axis) per call, in
    Pillow's order: horizontal first, but vertical first for a strip over 100 times taller than
    wide that shrinks in height (Pillow 12; torch would pick its own order, and the rounding of
    the pass in between then differs by many levels). In uint8 torch runs an image on one
    thread, whatever its thread count: intra-op threads cost no CPU here."""
    height, width = pixels.shape[2:]
    vertical_first = height > _PILLOW_TALL * width and size[0] < height
    steps = [(size[0], width), size] if vertical_first else [(height, size[1]), size]
    for step in steps:
        if tuple(pixels.shape[2:]) != step:
            pixels = F.interpolate(pixels, size=step, mode=mode, antialias=True)
    return pixels


def _array(image: Image.Image) -> np.ndarray:
    """An RGB image's (H, W, 3) uint8 pixels, read-only: the `tobytes` that `np.asarray` makes
    underneath, without its array-interface wrapping (as cheap or a little cheaper)."""
    return np.frombuffer(image.tobytes(), np.uint8).reshape(image.height, image.width, 3)


def _center_crop(view: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """transformers' `center_crop`: offset `(side - crop) // 2`; where the crop is larger than
    the image, the outside is zeros (as Pillow's crop of a box beyond the image)."""
    height, width = view.shape[:2]
    crop_height, crop_width = size
    if (height, width) == size:
        return view
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return view[top : top + crop_height, left : left + crop_width]
    inside = view[max(top, 0) : top + crop_height, max(left, 0) : left + crop_width]
    row, column = max(-top, 0), max(-left, 0)
    padded = np.zeros((crop_height, crop_width, 3), np.uint8)
    padded[row : row + inside.shape[0], column : column + inside.shape[1]] = inside
    return padded


def normalize(
    batch: torch.Tensor, spec: ViewSpec, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Stacked views, (N, H, W, 3) uint8, to the model's `pixel_values`: (N, 3, H, W) in `dtype`,
    contiguous, on the batch's own device.

    Channels move first while the pixels are still uint8 (a quarter of the bytes of float32;
    3x faster on a CPU than permuting the float result). Then the processor's arithmetic, in
    float32 (rescale, subtract the mean, divide by the std), and one cast to `dtype`. The rescale
    divides by `1 / rescale_factor`: for 1/255 that is bit-identical to NumPy's float64 multiply
    then float32 cast, where a float32 multiply is one unit in the last place off for half of
    the 256 levels. The divisor is a tensor, not a Python number, because CUDA turns division by
    a host scalar into a multiply by its reciprocal.
    """
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(
            f"expected stacked uint8 views of shape (N, H, W, 3), got {batch.dtype} "
            f"{tuple(batch.shape)}"
        )
    if tuple(batch.shape[1:3]) != spec.size:
        raise ValueError(f"views of size {tuple(batch.shape[1:3])} do not match {spec.size}")
    divisor, mean, std = _constants(spec, batch.device)
    channels_first = batch.permute(0, 3, 1, 2).contiguous()
    if divisor is None:
        pixels = channels_first.to(torch.float32)
    else:
        pixels = channels_first.to(torch.float32).div_(divisor)  # as exact, twice as fast
    if mean is not None and std is not None:
        pixels = pixels.sub_(mean).div_(std)
    return pixels.to(dtype)


@functools.lru_cache(maxsize=64)
def _constants(
    spec: ViewSpec, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The float32 constants of `normalize`, made once per spec and device (no copy per batch)."""

    def tensor(values: float | Sequence[float] | None) -> torch.Tensor | None:
        if values is None:
            return None
        return torch.tensor(values, dtype=torch.float32, device=device).reshape(-1, 1, 1)

    divisor = None if spec.rescale_factor is None else 1 / spec.rescale_factor
    return tensor(divisor), tensor(spec.mean), tensor(spec.std)


def view_spec_from_processor(processor: Any) -> ViewSpec:
    """The view a Hugging Face image processor makes, read from its own settings.

    Takes the image processor (`BlipImageProcessorPil`, `CLIPImageProcessorPil`, ...), or a
    multimodal processor holding one as `image_processor`. Understands `size` as
    `{height, width}` (squash) or `{shortest_edge}` (then a centre crop to `crop_size`),
    `do_resize`, `do_center_crop`, `resample`, `do_rescale`, `rescale_factor`, `do_normalize`,
    `image_mean`, `image_std`, `do_convert_rgb` (views are made from RGB images either way).
    Raises `ValueError` for anything else that would change the pixels (padding, other size
    rules, variable output sizes, a class with its own preprocessing steps), rather than
    quietly making views the model was not trained on.
    """
    processor = getattr(processor, "image_processor", processor)
    _check_stock_pipeline(processor)
    name = type(processor).__name__
    if getattr(processor, "do_pad", False):
        raise ValueError(f"{name}: do_pad is not supported")

    resample = _resample(getattr(processor, "resample", None), name)
    size = _size_dict(getattr(processor, "size", None))
    resize: Resize = "none"
    squash_size = None
    shortest_edge = None
    if getattr(processor, "do_resize", False):
        if set(size) == {"height", "width"}:
            resize, squash_size = "squash", (int(size["height"]), int(size["width"]))
        elif set(size) == {"shortest_edge"}:
            resize, shortest_edge = "shortest_edge", int(size["shortest_edge"])
        else:
            raise ValueError(
                f"{name}: size {size} is not supported (only {{height, width}} or "
                "{shortest_edge})"
            )

    center_crop = bool(getattr(processor, "do_center_crop", False))
    if center_crop:
        crop = _size_dict(getattr(processor, "crop_size", None))
        if set(crop) != {"height", "width"}:
            raise ValueError(f"{name}: crop_size {crop} must give height and width")
        view_size = (int(crop["height"]), int(crop["width"]))
    elif resize == "squash":
        assert squash_size is not None
        view_size = squash_size
    else:
        raise ValueError(
            f"{name}: without a centre crop, resize {resize!r} gives images of varying size"
        )

    rescale_factor = None
    if getattr(processor, "do_rescale", False):
        rescale_factor = float(processor.rescale_factor)
        if not rescale_factor > 0:
            raise ValueError(f"{name}: rescale_factor {rescale_factor} must be positive")
    mean = std = None
    if getattr(processor, "do_normalize", False):
        mean = _per_channel(processor.image_mean, "image_mean", name)
        std = _per_channel(processor.image_std, "image_std", name)
        if not all(value > 0 for value in std):
            raise ValueError(f"{name}: image_std {std} must be positive")

    return ViewSpec(
        size=view_size,
        resize=resize,
        resample=resample,
        squash_size=squash_size,
        shortest_edge=shortest_edge,
        center_crop=center_crop,
        rescale_factor=rescale_factor,
        mean=mean,
        std=std,
    )


def _check_stock_pipeline(processor: Any) -> None:
    for method in _PIPELINE_METHODS:
        owner = next((cls for cls in type(processor).__mro__ if method in vars(cls)), None)
        if owner is None or owner.__module__ not in _STOCK_MODULES:
            where = "nowhere" if owner is None else f"in {owner.__module__}.{owner.__qualname__}"
            raise ValueError(
                f"{type(processor).__name__} is not a standard resize/crop/normalise image "
                f"processor: its {method} is defined {where}"
            )


def _size_dict(size: Any) -> dict[str, int]:
    """A `SizeDict` or plain dict as a dict of its set keys only."""
    if size is None:
        return {}
    return {key: value for key, value in dict(size).items() if value is not None}


def _resample(value: Any, name: str) -> Image.Resampling:
    """Pillow's filter; `None` is BILINEAR, as in the PIL backend's `resize`."""
    if value is None:
        return Image.Resampling.BILINEAR
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        try:
            return Image.Resampling(int(value))
        except ValueError:
            pass
    raise ValueError(f"{name}: resample {value!r} is not a Pillow filter")


def _per_channel(value: Any, field: str, name: str) -> tuple[float, float, float]:
    """One float per RGB channel; a single number applies to all three, as in transformers."""
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"{name}: {field} {value} needs 3 values, one per RGB channel")
    return values[0], values[1], values[2]


@dataclass(frozen=True, eq=False)
class ViewBatch:
    """The views of several images, stacked per spec: one uint8 (N, H, W, 3) tensor for each
    model input, and each image's decoded (width, height). What crosses to a model engine
    (torch shares a tensor's memory with another process instead of pickling its bytes) and to
    the device, in one piece per input."""

    views: dict[ViewSpec, torch.Tensor]
    sizes: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.sizes)

    @classmethod
    def stack(cls, images: Sequence[ImageViews], space: StackSpace | None = None) -> ViewBatch:
        """Stack the views that every image has (the decode step makes the same set for all):
        into `space`'s memory when given, else into new memory."""
        specs = images[0].views.keys() if images else ()
        views = {}
        for spec in specs:
            arrays = [image.views[spec] for image in images]
            if space is None:
                views[spec] = torch.from_numpy(np.stack(arrays))
            else:
                views[spec] = space.take(spec, len(arrays))
                np.stack(arrays, out=views[spec].numpy())
        return cls(views, tuple(image.size for image in images))

    @classmethod
    def concat(cls, batches: Sequence[ViewBatch]) -> ViewBatch:
        """Several batches as one (requests of several workers merged into one model call)."""
        if len(batches) == 1:
            return batches[0]
        specs = batches[0].views.keys()
        return cls(
            {spec: torch.cat([b.views[spec] for b in batches]) for spec in specs},
            tuple(size for b in batches for size in b.sizes),
        )

    def select(self, indexes: Sequence[int]) -> ViewBatch:
        """The images at `indexes`, in that order."""
        if list(indexes) == list(range(len(self))):
            return self
        index = torch.tensor(list(indexes), dtype=torch.long)
        return ViewBatch(
            {spec: view[index.to(view.device)] for spec, view in self.views.items()},
            tuple(self.sizes[i] for i in indexes),
        )

    def to(self, device: torch.device) -> ViewBatch:
        """On `device` (see `to_device`)."""
        return ViewBatch(
            {spec: to_device(view, device) for spec, view in self.views.items()}, self.sizes
        )


class StackSpace:
    """Memory that batches of views are stacked into, reused from one batch to the next: a
    tensor per spec, replaced by a larger one when a batch needs it. Shared (`shared=True`), a
    batch stacked here crosses to another process as a handle, and neither process faults in
    fresh pages for it, batch after batch; private, it spares the allocator those pages.

    A batch stacked here lasts until the next one is: one space per thread, whose calls
    return only once their batch is used."""

    def __init__(self, shared: bool = False) -> None:
        self.shared = shared
        self._tensors: dict[ViewSpec, torch.Tensor] = {}

    def take(self, spec: ViewSpec, count: int) -> torch.Tensor:
        """(count, height, width, 3) uint8 of this space's memory for views of `spec`."""
        tensor = self._tensors.get(spec)
        if tensor is None or len(tensor) < count:
            tensor = torch.empty((count, *spec.size, 3), dtype=torch.uint8)
            if self.shared:
                tensor.share_memory_()
            self._tensors[spec] = tensor
        return tensor[:count]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; to a GPU through page-locked memory, so that the copy runs
    asynchronously (on the current stream) while the host goes on."""
    if tensor.device == device or device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
