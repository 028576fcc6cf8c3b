"""Model-ready views equal what Hugging Face's own processors feed the models.

The processors are the real PIL-backend classes, built from the real checkpoints' configs, and
their `pixel_values` are the reference: `normalize(make_view(image))` must match them for every
size and aspect ratio. Bilinear and bicubic views are resized by torch's uint8 kernels, whose
fixed-point weights round a little differently from Pillow's: a value may be one level off,
rarely two, never more (`assert_close`). The normalisation itself is bit-identical, and Pillow's
other filters are used as they are, so those views are too.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import pytest
import torch
from apache_beam.utils.multi_process_shared import AUTH_KEY
from PIL import Image
from transformers import BlipImageProcessorPil, BlipProcessor, CLIPImageProcessorPil

from benchmarks.views import pillow_view
from captionflow.views import (
    ImageViews,
    StackSpace,
    ViewBatch,
    ViewSpec,
    covering_size,
    make_view,
    make_views,
    normalize,
    view_spec_from_processor,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The checkpoints' preprocessor_config.json files as published on the Hugging Face Hub,
# transcribed (no network here to fetch them). The CLIP ones match copies quoted in public code;
# they use the old integer form of `size` and `crop_size`, which transformers turns into
# {shortest_edge} and {height, width}. The two BLIP files differ in form (an integer `size`
# vs a {height, width} dict and an explicit rescale); both omit `resample`, so the class
# default (BICUBIC) applies: exactly the defaults and legacy forms that loading must get right.
HUB_CONFIGS: dict[str, tuple[type, dict[str, Any]]] = {
    "Salesforce/blip-image-captioning-base": (
        BlipImageProcessorPil,
        {
            "do_normalize": True,
            "do_resize": True,
            "image_mean": list(CLIP_MEAN),
            "image_processor_type": "BlipImageProcessor",
            "image_std": list(CLIP_STD),
            "processor_class": "BlipProcessor",
            "size": 384,
        },
    ),
    "Salesforce/blip-image-captioning-large": (
        BlipImageProcessorPil,
        {
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(CLIP_MEAN),
            "image_processor_type": "BlipImageProcessor",
            "image_std": list(CLIP_STD),
            "processor_class": "BlipProcessor",
            "rescale_factor": 0.00392156862745098,
            "size": {"height": 384, "width": 384},
        },
    ),
    "openai/clip-vit-base-patch32": (
        CLIPImageProcessorPil,
        {
            "crop_size": 224,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD),
            "resample": 3,
            "size": 224,
        },
    ),
    "openai/clip-vit-large-patch14-336": (
        CLIPImageProcessorPil,
        {
            "crop_size": 336,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD),
            "resample": 3,
            "size": 336,
        },
    ),
}

# Settings no shipped BLIP/CLIP uses but that the spec describes: a crop larger than the
# resized image (zero padding), a squash followed by a crop, a crop alone, and other filters
# and normalisations.
OTHER_CONFIGS: dict[str, tuple[type, dict[str, Any]]] = {
    "shortest-edge-smaller-than-crop": (
        CLIPImageProcessorPil,
        {"size": {"shortest_edge": 200}, "crop_size": {"height": 224, "width": 256}},
    ),
    "squash-then-crop-bilinear": (
        BlipImageProcessorPil,
        {
            "size": {"height": 300, "width": 400},
            "do_center_crop": True,
            "crop_size": {"height": 255, "width": 384},
            "resample": 2,
        },
    ),
    "crop-only-no-rescale": (
        CLIPImageProcessorPil,
        {"do_resize": False, "crop_size": 100, "do_rescale": False, "image_mean": 0.5},
    ),
    "lanczos-no-normalize": (
        BlipImageProcessorPil,
        {"size": {"height": 97, "width": 64}, "resample": 1, "do_normalize": False},
    ),
}

# (width, height): degenerate, odd, even, enlarged, one off the model size either way, both
# orientations, extreme strips (Pillow resizes those over 100:1 tall vertically first), what
# `decode_image` gives for photos (768 on the long side) and JPEGs drafted to cover the views.
SIZES = [
    (1, 1),
    (2, 3),
    (7, 5),
    (5, 7),
    (50, 40),
    (41, 53),
    (100, 100),
    (224, 224),
    (225, 223),
    (299, 201),
    (336, 336),
    (337, 500),
    (383, 384),
    (384, 383),
    (384, 384),
    (385, 385),
    (480, 640),
    (640, 480),
    (768, 576),
    (768, 768),
    (1000, 750),
    (1000, 37),
    (37, 1000),
    (3, 400),
    (400, 3),
    (500, 1),
    (1, 500),
]
OTHER_SIZES = [(1, 1), (7, 5), (90, 120), (255, 256), (640, 480), (37, 1000)]


def tolerance(spec: ViewSpec, levels: int = 1) -> float:
    """`levels` uint8 levels after normalisation: 1/255/min(std) each (0.0150 for CLIP's std),
    plus float32 rounding."""
    level = spec.rescale_factor or 1.0
    return levels * level / min(spec.std or (1.0,)) + 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, spec: ViewSpec) -> None:
    """The views' contract with the processors: no value more than two uint8 levels off, under
    0.05% of them two levels off, under 1% (bicubic) or 5% (bilinear) off at all. Measured
    here: at most 0.011%, 0.92% and 1.5% (bilinear reaches 4% on noise shrunk 640x480 to
    384x384). A wrong size, offset, filter or constant puts most values many levels off."""
    assert actual.shape == expected.shape
    difference = (actual.float() - expected.float()).abs()
    assert difference.max().item() <= tolerance(spec, 2)
    assert (difference > tolerance(spec, 1)).float().mean().item() < 0.0005
    rare = 0.01 if spec.resample == Image.Resampling.BICUBIC else 0.05
    assert (difference > 1e-5).float().mean().item() < rare


def processor(name: str) -> Any:
    cls, config = {**HUB_CONFIGS, **OTHER_CONFIGS}[name]
    return cls.from_dict(config)


def random_rgb(width: int, height: int, seed: int) -> Image.Image:
    """Uniform noise: every level 0..255, and the most high-frequency content a filter sees."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def ours(image: Image.Image, spec: ViewSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    view = make_view(image, spec)
    return normalize(torch.from_numpy(np.stack([view])), spec, dtype)


def theirs(image: Image.Image, image_processor: Any) -> torch.Tensor:
    return torch.from_numpy(image_processor(image, return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_view_matches_the_processor(name: str, size: tuple[int, int]) -> None:
    image_processor = processor(name)
    spec = view_spec_from_processor(image_processor)
    for seed in range(2):
        image = random_rgb(*size, seed=seed)
        expected, actual = theirs(image, image_processor), ours(image, spec)
        assert actual.shape == expected.shape == (1, 3, *spec.size)
        assert actual.dtype == torch.float32 and actual.is_contiguous()
        assert_close(actual, expected, spec)


def photo(width: int, height: int) -> Image.Image:
    """A smooth picture with some grain, as photos are: a bicubic resize rings on its edges."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256])
    grain = np.random.default_rng(0).normal(0, 8, base.shape)
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8).transpose(1, 2, 0))


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1000, 750), (64, 48), (300, 2000)])
@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_view_of_a_photo_matches_the_processor(name: str, size: tuple[int, int]) -> None:
    image_processor = processor(name)
    spec = view_spec_from_processor(image_processor)
    image = photo(*size)
    assert_close(ours(image, spec), theirs(image, image_processor), spec)


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_normalize_is_bit_identical_to_the_processors_arithmetic(name: str) -> None:
    """Given the processor's own uint8 pixels, `normalize` gives its `pixel_values` bit for bit,
    in float32 and any cast of it (bfloat16 here): float32 arithmetic that rounds as NumPy's
    does. Only the resize may differ (by the levels `assert_close` allows). If a new
    transformers changes its arithmetic, this test fails first."""
    image_processor = processor(name)
    spec = view_spec_from_processor(image_processor)
    for seed, size in enumerate(SIZES):
        image = random_rgb(*size, seed=100 + seed)
        expected = theirs(image, image_processor)
        views = torch.from_numpy(np.stack([pillow_view(image, spec)]))
        assert torch.equal(normalize(views, spec), expected), size
        assert torch.equal(normalize(views, spec, torch.bfloat16), expected.to(torch.bfloat16))


@pytest.mark.parametrize("size", OTHER_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(OTHER_CONFIGS))
def test_other_supported_settings_match_the_processor(name: str, size: tuple[int, int]) -> None:
    image_processor = processor(name)
    spec = view_spec_from_processor(image_processor)
    image = random_rgb(*size, seed=7)
    expected, actual = theirs(image, image_processor), ours(image, spec)
    if spec.resample in (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC):
        assert_close(actual, expected, spec)
    else:  # Pillow's own resize, as the processor's
        assert torch.equal(actual, expected.float())


@pytest.mark.parametrize(
    "resample",
    [
        Image.Resampling.NEAREST,
        Image.Resampling.BOX,
        Image.Resampling.HAMMING,
        Image.Resampling.LANCZOS,
    ],
    ids=lambda r: r.name,
)
@pytest.mark.parametrize("size", [(7, 5), (640, 480), (37, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_filters_torch_lacks_are_pillows_bit_for_bit(
    resample: Image.Resampling, size: tuple[int, int]
) -> None:
    image_processor = BlipImageProcessorPil(size={"height": 97, "width": 64}, resample=resample)
    spec = view_spec_from_processor(image_processor)
    image = random_rgb(*size, seed=3)
    assert torch.equal(ours(image, spec), theirs(image, image_processor))


def test_a_bicubic_view_is_not_a_bilinear_one() -> None:
    """`assert_close` tells the filters apart: one asked for is the one used."""
    bicubic = view_spec_from_processor(processor("Salesforce/blip-image-captioning-base"))
    bilinear = ViewSpec(**{**vars(bicubic), "resample": Image.Resampling.BILINEAR})
    image = random_rgb(640, 480, seed=5)
    with pytest.raises(AssertionError):
        assert_close(ours(image, bilinear), ours(image, bicubic), bicubic)


def test_a_batch_is_normalised_at_once_in_the_models_dtype() -> None:
    image_processor = processor("openai/clip-vit-base-patch32")
    spec = view_spec_from_processor(image_processor)
    images = [random_rgb(w, h, seed=i) for i, (w, h) in enumerate([(640, 480), (37, 1000), (9, 9)])]
    batch = torch.from_numpy(np.stack([make_view(image, spec) for image in images]))
    expected = torch.from_numpy(image_processor(images, return_tensors="np")["pixel_values"])
    in_float32 = normalize(batch, spec)
    assert_close(in_float32, expected, spec)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        pixels = normalize(batch, spec, dtype)
        assert pixels.dtype == dtype and pixels.shape == (3, 3, 224, 224)
        assert torch.equal(pixels, in_float32.to(dtype))  # float32 arithmetic, one cast


def test_views_are_read_only_contiguous_uint8_and_made_once_per_spec() -> None:
    specs = [EXPECTED_SPECS[name] for name in HUB_CONFIGS]  # two BLIP specs are one
    lanczos = ViewSpec((97, 64), "squash", Image.Resampling.LANCZOS, squash_size=(97, 64))
    image = random_rgb(640, 480, seed=9)
    views = make_views(image, [*specs, lanczos])
    assert isinstance(views, ImageViews) and views.size == (640, 480)
    assert list(views.views) == [BLIP_SPEC, clip_spec(224), clip_spec(336), lanczos]
    for spec, view in views.views.items():
        assert view.shape == (*spec.size, 3) and view.dtype == np.uint8
        assert view.flags.c_contiguous and not view.flags.writeable
        assert np.array_equal(view, make_view(image, spec))


def clip_spec(edge: int) -> ViewSpec:
    """CLIP's view: shortest edge to `edge`, then a centre crop to `edge` x `edge`."""
    return ViewSpec(
        size=(edge, edge),
        resize="shortest_edge",
        shortest_edge=edge,
        center_crop=True,
        resample=Image.Resampling.BICUBIC,
        rescale_factor=1 / 255,
        mean=CLIP_MEAN,
        std=CLIP_STD,
    )


BLIP_SPEC = ViewSpec(
    size=(384, 384),
    resize="squash",
    squash_size=(384, 384),
    resample=Image.Resampling.BICUBIC,
    rescale_factor=1 / 255,
    mean=CLIP_MEAN,
    std=CLIP_STD,
)
EXPECTED_SPECS = {
    "Salesforce/blip-image-captioning-base": BLIP_SPEC,
    "Salesforce/blip-image-captioning-large": BLIP_SPEC,
    "openai/clip-vit-base-patch32": clip_spec(224),
    "openai/clip-vit-large-patch14-336": clip_spec(336),
}


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_spec_read_from_each_checkpoint_config(name: str) -> None:
    spec = view_spec_from_processor(processor(name))
    assert spec == EXPECTED_SPECS[name]
    assert hash(spec) == hash(EXPECTED_SPECS[name])  # equal specs can key one shared view


def test_spec_of_a_saved_checkpoint_through_its_multimodal_processor(tiny_blip: str) -> None:
    spec = view_spec_from_processor(BlipProcessor.from_pretrained(tiny_blip))
    assert (spec.size, spec.resize, spec.squash_size) == ((32, 32), "squash", (32, 32))


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (640, 480, (224, 298)),  # 224 * 640 / 480 = 298.67: truncated, not rounded
        (480, 640, (298, 224)),
        (1000, 37, (224, 6054)),  # 6054.05
        (1, 1, (224, 224)),
        (225, 224, (224, 225)),
    ],
)
def test_shortest_edge_truncates_the_long_side_as_transformers_does(
    width: int, height: int, expected: tuple[int, int]
) -> None:
    spec = EXPECTED_SPECS["openai/clip-vit-base-patch32"]
    assert spec.resized_size(width, height) == expected


def test_the_size_a_reduced_decode_must_keep_for_the_views() -> None:
    crop_only = view_spec_from_processor(processor("crop-only-no-rescale"))
    wide = ViewSpec((300, 400), "squash", squash_size=(300, 400))
    assert BLIP_SPEC.min_source_size() == (384, 384)
    assert clip_spec(224).min_source_size() == (224, 224)  # the short side, either way round
    assert crop_only.min_source_size() is None  # its pixels are the image's own
    assert covering_size([BLIP_SPEC, clip_spec(224), clip_spec(336)]) == (384, 384)
    assert covering_size([wide, clip_spec(336)]) == (336, 400)
    assert covering_size([BLIP_SPEC, crop_only]) is None
    assert covering_size([]) is None


class PatchingProcessor(BlipImageProcessorPil):
    """A processor with steps of its own, as patch- and tile-based models have."""

    def _preprocess(self, images: list[np.ndarray], **kwargs: Any) -> Any:
        return super()._preprocess(images, **kwargs)


@pytest.mark.parametrize(
    ("image_processor", "message"),
    [
        (BlipImageProcessorPil(do_pad=True), "do_pad"),
        (BlipImageProcessorPil(size={"longest_edge": 384}), "size"),
        (BlipImageProcessorPil(size={"shortest_edge": 384, "longest_edge": 500}), "size"),
        (CLIPImageProcessorPil(do_center_crop=False), "varying size"),
        (CLIPImageProcessorPil(do_resize=False, do_center_crop=False), "varying size"),
        (BlipImageProcessorPil(resample="bicubic"), "resample"),
        (BlipImageProcessorPil(image_mean=[0.5, 0.5]), "image_mean"),
        (BlipImageProcessorPil(image_std=[0.5, 0.0, 0.5]), "image_std"),
        (PatchingProcessor(), "_preprocess"),
    ],
    ids=lambda value: value if isinstance(value, str) else type(value).__name__,
)
def test_unsupported_settings_are_refused_clearly(image_processor: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        view_spec_from_processor(image_processor)


def test_make_view_wants_rgb_and_normalize_wants_stacked_uint8_views() -> None:
    spec = EXPECTED_SPECS["openai/clip-vit-base-patch32"]
    with pytest.raises(ValueError, match="RGB"):
        make_view(Image.new("RGBA", (10, 10)), spec)
    view = make_view(random_rgb(50, 40, seed=0), spec)
    assert view.dtype == np.uint8 and view.shape == (224, 224, 3)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        normalize(torch.from_numpy(np.stack([view])).float(), spec)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        normalize(torch.from_numpy(view.copy()), spec)
    with pytest.raises(ValueError, match="do not match"):
        normalize(torch.zeros((1, 384, 384, 3), dtype=torch.uint8), spec)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"resize": "fit"}, "unknown resize"),
        ({"resize": "squash"}, "squash_size"),
        ({"resize": "shortest_edge", "center_crop": True}, "shortest_edge"),
        ({"resize": "shortest_edge", "shortest_edge": 224}, "varying size"),
        ({"resize": "squash", "squash_size": (384, 300)}, "view's size"),
        ({"resize": "squash", "squash_size": (224, 224), "mean": CLIP_MEAN}, "together"),
    ],
)
def test_a_spec_that_cannot_make_fixed_size_views_is_refused(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ViewSpec(size=(224, 224), **fields)


def test_batches_stacked_into_a_shared_space_reuse_its_memory_and_cross_without_a_copy() -> None:
    specs = [BLIP_SPEC, clip_spec(224)]
    images = [make_views(random_rgb(64 + 8 * i, 48, seed=i), specs) for i in range(7)]
    space = StackSpace(shared=True)
    first = ViewBatch.stack(images[:4], space)
    memory = {spec: first.views[spec].data_ptr() for spec in specs}
    for spec in specs:
        assert first.views[spec].is_shared()
        assert torch.equal(first.views[spec], ViewBatch.stack(images[:4]).views[spec])
    second = ViewBatch.stack(images[4:], space)  # smaller: the same memory, overwritten
    for spec in specs:
        assert second.views[spec].data_ptr() == memory[spec]
        assert torch.equal(second.views[spec], ViewBatch.stack(images[4:]).views[spec])
    # Pickled for another process, a shared batch is a handle: its memory stays where it is,
    # where a batch stacked anywhere else is first moved (copied) into new shared memory.
    multiprocessing.current_process().authkey = AUTH_KEY
    ForkingPickler.dumps(second)
    assert all(second.views[spec].data_ptr() == memory[spec] for spec in specs)
    plain = ViewBatch.stack(images[4:])
    before = plain.views[BLIP_SPEC].data_ptr()
    ForkingPickler.dumps(plain)
    assert plain.views[BLIP_SPEC].data_ptr() != before
    larger = ViewBatch.stack(images, space)  # grows
    assert torch.equal(larger.views[BLIP_SPEC], ViewBatch.stack(images).views[BLIP_SPEC])
    assert ViewBatch.stack(images[:2], space).views[BLIP_SPEC].data_ptr() == (
        larger.views[BLIP_SPEC].data_ptr()
    )


def test_a_private_space_is_reused_and_not_shared() -> None:
    images = [make_views(random_rgb(40, 30, seed=i), [BLIP_SPEC]) for i in range(3)]
    space = StackSpace()
    first = ViewBatch.stack(images, space).views[BLIP_SPEC]
    assert not first.is_shared()
    assert ViewBatch.stack(images[1:], space).views[BLIP_SPEC].data_ptr() == first.data_ptr()
