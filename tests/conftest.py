"""Shared fixtures: tiny random models built offline, and small generated images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """`(blip_dir, clip_dir)`: saved with `save_pretrained`, loaded back like any checkout."""
    from captionflow.tiny_models import build_tiny_models

    return build_tiny_models(str(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="session")
def tiny_blip(tiny_models: tuple[str, str]) -> str:
    return tiny_models[0]


@pytest.fixture(scope="session")
def tiny_clip(tiny_models: tuple[str, str]) -> str:
    return tiny_models[1]


class Calls:
    """Counts the images a module (a vision tower) is given, through a forward hook: how
    many times each image was encoded."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.images = 0
        module.register_forward_hook(self._count, with_kwargs=True)

    def _count(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        self.images += (args[0] if args else kwargs["pixel_values"]).shape[0]


def random_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def write_images(directory: Path, count: int, suffix: str = ".jpg") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"image_{i:03d}{suffix}"
        random_image(64 + 8 * i, 48, seed=i).save(path)
        paths.append(path)
    return paths


def image_like_zoo(folder: Path) -> tuple[list[str], dict[str, str]]:
    """`(paths, {path: error type})`: files with every image-like extension (some Pillow cannot
    open), a link to an image, a broken link, link loops, and files that are not images."""
    write_images(folder, 1)
    names = ["a.avif", "b.HEIC", "c.heif", "d.svg", "e.jxl", "f.jpe", "g.jp2", "h.ico", "i.JPG"]
    for name in names:
        (folder / name).write_bytes(b"whatever")
    (folder / "alias.jpg").symlink_to(folder / "image_000.jpg")
    (folder / "gone.jpg").symlink_to(folder / "nowhere.jpg")
    (folder / "self.png").symlink_to(folder / "self.png")
    (folder / "ping.webp").symlink_to(folder / "pong.webp")
    (folder / "pong.webp").symlink_to(folder / "ping.webp")
    (folder / "notes.txt").write_text("not an image")
    (folder / "gone.txt").symlink_to(folder / "nowhere.txt")
    paths = [str(folder / name) for name in ["image_000.jpg", *names, "alias.jpg"]]
    errors = {str(folder / "gone.jpg"): "BrokenSymlink"} | {
        str(folder / name): "SymlinkLoop" for name in ["self.png", "ping.webp", "pong.webp"]
    }
    return paths, errors


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Four small JPEGs in a folder."""
    write_images(tmp_path / "images", 4)
    return tmp_path / "images"
