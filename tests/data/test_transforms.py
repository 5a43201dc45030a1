"""Preprocessing (spec section 2) and the image-file Dataset's error handling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cir_cli.data.images import ImageFiles, ImageLoadError, open_rgb
from cir_cli.data.transforms import CLIP_MEAN, CLIP_STD, SquarePad, TargetPad, build_transform
from cir_cli.errors import CirError

MEAN = torch.tensor(CLIP_MEAN)
STD = torch.tensor(CLIP_STD)


def normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - MEAN) / STD


@pytest.mark.parametrize(
    ("size", "ratio", "expected"),
    [
        ((1000, 500), 1.25, (1000, 800)),  # the spec's example: S=800, vp=150
        ((500, 1000), 1.25, (800, 1000)),
        ((1001, 500), 1.25, (1001, 800)),  # S=800.8, vp=int(150.4)=150
        ((999, 333), 1.5, (999, 665)),  # S=666, vp=int(166.5)=166
        ((1100, 1000), 1.25, (1100, 1000)),  # aspect 1.1 < 1.25: unchanged
        ((1000, 800), 1.25, (1000, 800)),  # aspect == ratio: padded by int(0)=0
        ((300, 300), 1.0, (300, 300)),
    ],
)
def test_target_pad_sizes(size: tuple[int, int], ratio: float, expected: tuple[int, int]) -> None:
    assert TargetPad(ratio)(Image.new("RGB", size, "white")).size == expected


def test_target_pad_below_ratio_returns_the_same_image() -> None:
    image = Image.new("RGB", (110, 100))
    assert TargetPad(1.25)(image) is image


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((100, 60), (100, 100)),
        ((101, 60), (101, 100)),  # vp=int(41/2)=20: 1 px short, left to the centre crop
        ((60, 101), (100, 101)),
        ((64, 64), (64, 64)),
    ],
)
def test_square_pad_sizes(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert SquarePad()(Image.new("RGB", size, "white")).size == expected


def test_pad_is_black_and_centred() -> None:
    out = TargetPad(1.25)(Image.new("RGB", (1000, 500), (255, 255, 255)))
    assert out.getpixel((500, 0)) == (0, 0, 0) and out.getpixel((500, 149)) == (0, 0, 0)
    assert out.getpixel((500, 150)) == (255, 255, 255)
    assert out.getpixel((500, 649)) == (255, 255, 255) and out.getpixel((500, 650)) == (0, 0, 0)


@pytest.mark.parametrize("kind", ["targetpad", "squarepad", "clip"])
def test_build_transform_shapes(kind: str) -> None:
    t = build_transform(kind, 32)
    for size in [(1000, 500), (50, 170), (31, 31)]:
        x = t(Image.new("RGB", size, (255, 255, 255)))
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # A white image normalises to (1 - mean) / std on every pixel.
    x = t(Image.new("RGB", (40, 40), (255, 255, 255)))
    assert torch.allclose(x[:, 5, 5], normalised((255, 255, 255)), atol=1e-5)


def test_transform_kinds_differ_on_wide_images() -> None:
    image = Image.new("RGB", (100, 50), (255, 255, 255))
    # targetpad: 100x80 -> crop 80 wide; rows 0..14 are padding.
    x = build_transform("targetpad", 80)(image)
    assert torch.allclose(x[:, 0, 40], normalised((0, 0, 0)), atol=1e-5)
    assert torch.allclose(x[:, 40, 40], normalised((255, 255, 255)), atol=1e-5)
    # clip: no padding at all -> all white.
    x = build_transform("clip", 50)(image)
    assert torch.allclose(x[:, 0, 25], normalised((255, 255, 255)), atol=1e-5)
    # squarepad: 100x100, rows 0..24 are padding -> after resize to 50, rows 0..11 are black.
    x = build_transform("squarepad", 50)(image)
    assert torch.allclose(x[:, 0, 25], normalised((0, 0, 0)), atol=1e-5)


def test_palette_and_rgba_pad_black_when_converting_first() -> None:
    # Palette entry 0 is red: the reference's pad-before-convert fills with red (the default,
    # tests/data/test_reference_preprocessing.py); rgb="first" (fixes.convert_rgb_first) pads black.
    palette_image = Image.new("P", (100, 50), 1)
    palette_image.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    rgba = Image.new("RGBA", (100, 50), (0, 255, 0, 0))  # transparent green, alpha dropped
    for image in (palette_image, rgba):
        x = build_transform("targetpad", 80, rgb="first")(image)
        assert torch.allclose(x[:, 0, 40], normalised((0, 0, 0)), atol=1e-5), image.mode
        assert torch.allclose(x[:, 40, 40], normalised((0, 255, 0)), atol=1e-5), image.mode
    x = build_transform("targetpad", 80)(palette_image)
    assert torch.allclose(x[:, 0, 40], normalised((255, 0, 0)), atol=1e-5)


def test_build_transform_errors() -> None:
    with pytest.raises(CirError, match="unknown transform 'resize'; expected one of targetpad"):
        build_transform("resize", 224)
    with pytest.raises(CirError, match="size must be positive"):
        build_transform("clip", 0)
    with pytest.raises(CirError, match="target_ratio must be positive"):
        TargetPad(0)


# --- ImageFiles ---------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> list[tuple[str, Path]]:
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (20, 40), 128).save(tmp_path / "b.jpg")
    Image.new("P", (30, 30), 0).save(tmp_path / "c.png")
    return [("a", tmp_path / "a.png"), ("b", tmp_path / "b.jpg"), ("c", tmp_path / "c.png")]


def test_image_files_returns_index_and_tensor(files: list[tuple[str, Path]]) -> None:
    ds = ImageFiles(files, build_transform("targetpad", 16))
    assert len(ds) == 3 and ds.names == ["a", "b", "c"]
    index, x = ds[1]
    assert index == 1 and x.shape == (3, 16, 16)
    batches = list(DataLoader(ds, batch_size=2))
    assert [b[0].tolist() for b in batches] == [[0, 1], [2]]
    assert batches[0][1].shape == (2, 3, 16, 16)
    assert open_rgb(files[2][1]).mode == "RGB"


def test_image_files_from_names(files: list[tuple[str, Path]]) -> None:
    ds = ImageFiles.from_names(["c", "a"], dict(files), build_transform("clip", 8))
    assert ds.names == ["c", "a"] and ds.files[0][1] == files[2][1]


def test_missing_and_corrupt_images_raise(files: list[tuple[str, Path]], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"definitely not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(files[0][1].read_bytes()[:60])
    ds = ImageFiles(
        [("m", tmp_path / "missing.png"), ("g", garbage), ("t", truncated)],
        build_transform("clip", 8),
    )
    with pytest.raises(CirError, match=r"image file .*missing\.png not found"):
        ds[0]
    with pytest.raises(CirError, match=r"cannot read image .*garbage\.png: UnidentifiedImageError"):
        ds[1]
    with pytest.raises(CirError, match=r"cannot read image .*truncated\.png"):
        ds[2]


def test_worker_error_stays_one_line(files: list[tuple[str, Path]], tmp_path: Path) -> None:
    ds = ImageFiles([*files, ("m", tmp_path / "missing.png")], build_transform("clip", 8))
    batches = iter(DataLoader(ds, batch_size=2, num_workers=1))
    try:
        for _ in batches:
            pass
    except ImageLoadError as e:
        message, worker_traceback = str(e), e.worker_traceback
        # torch's re-raise leaves the exception in a reference cycle with the frames that hold
        # the loader iterator; freed later by gc, the worker shutdown runs out of order and
        # waits out a 5 s join timeout. Breaking the cycle lets `del` shut it down now.
        e.__traceback__ = None
    else:
        pytest.fail("a missing image must raise ImageLoadError")
    del batches
    assert "\n" not in message and message.startswith("image file ")
    assert "missing.png not found" in message
    assert "Traceback" in worker_traceback
