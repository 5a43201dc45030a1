"""Reference-exact preprocessing (issue 13): LinCIR's CLIPImageProcessor crop, and the RGB
conversion after the crop of the CLIP4Cir family, each against an independent second path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cir_cli.data.images import ImageFiles, open_image
from cir_cli.data.transforms import CLIP_MEAN, CLIP_STD, build_transform
from cir_cli.methods.base import CIRMethod
from cir_cli.recipes import load_recipe


def noise_image(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").convert("P")
        palette = rng.integers(0, 256, 256 * 3, dtype=np.uint8).tolist()
        palette[:3] = [255, 0, 0]  # entry 0 (the reference's pad colour) is red
        image.putpalette(palette)
        return image
    bands = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
    if mode == "RGBA":
        pixels[..., 3] = rng.integers(0, 2, (h, w)) * 255  # half the pixels transparent
    if bands == 1:
        pixels = pixels[..., 0]
    return Image.fromarray(pixels, mode) if mode != "CMYK" else Image.frombytes(
        "CMYK", (w, h), pixels.tobytes()
    )


# --- LinCIR: the `clip` transform is CLIPImageProcessor ---------------------------------------


def lincir_processor(**overrides):
    """LinCIR's processor (navervision/lincir models.py build_text_encoder), PIL backend.

    transformers 5 renamed the PIL/NumPy implementation LinCIR ran (4.x `CLIPImageProcessor`)
    to `CLIPImageProcessorPil`; its `CLIPImageProcessor` now resizes tensors with torchvision.
    """
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None)
    if cls is None:  # transformers 4.x: CLIPImageProcessor is the PIL implementation
        cls = transformers.CLIPImageProcessor
    kwargs = dict(
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        do_convert_rgb=True,
        do_normalize=True,
        do_rescale=True,
        do_resize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        resample=3,
        size={"shortest_edge": 224},
    )
    kwargs.update(overrides)
    return cls(**kwargs)


# Resized long side minus 224 is 3 mod 4 for the first five (the crop used to shift one pixel);
# the last three are controls where both roundings agree.
DIFFERED = [(640, 427), (427, 640), (1024, 683), (227, 224), (224, 331)]
AGREED = [(640, 480), (500, 333), (612, 612)]


@pytest.mark.parametrize("size", DIFFERED + AGREED)
def test_clip_transform_equals_clip_image_processor(size: tuple[int, int]) -> None:
    image = noise_image(size, seed=sum(size))
    ours = build_transform("clip", 224)(image)
    reference = torch.from_numpy(
        np.asarray(lincir_processor()(image, return_tensors="np")["pixel_values"][0])
    )
    assert ours.shape == reference.shape == (3, 224, 224)
    # Pixel for pixel: the uint8 crops are identical, so the normalised values agree to float32
    # rounding (torchvision divides by 255 in float32, transformers multiplies by 1/255 in
    # float64 first).
    assert torch.allclose(ours, reference, rtol=0, atol=1e-6), (ours - reference).abs().max()
    crop_only = lincir_processor(do_rescale=False, do_normalize=False)
    ref_uint8 = np.asarray(crop_only(image, return_tensors="np")["pixel_values"][0])
    ours_uint8 = np.rint(
        (ours * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None])
        .mul(255)
        .numpy()
    )
    assert np.array_equal(ours_uint8, ref_uint8.astype(np.float64))


@pytest.mark.parametrize("size", DIFFERED)
def test_torchvision_crop_switch_shifts_one_pixel(size: tuple[int, int]) -> None:
    """fixes.torchvision_center_crop keeps the previous crop: one pixel off on these sizes."""
    image = noise_image(size, seed=sum(size))
    floor = build_transform("clip", 224)(image)
    rounded = build_transform("clip", 224, crop="torchvision")(image)
    assert (floor - rounded).abs().max() > 0.5
    # The shift is exactly one pixel along the long side.
    axis = 2 if size[0] > size[1] else 1
    assert torch.equal(floor.narrow(axis, 1, 223), rounded.narrow(axis, 0, 223))


@pytest.mark.parametrize("size", AGREED)
def test_torchvision_crop_agrees_elsewhere(size: tuple[int, int]) -> None:
    image = noise_image(size, seed=1)
    assert torch.equal(
        build_transform("clip", 224)(image), build_transform("clip", 224, crop="torchvision")(image)
    )


# --- CLIP4Cir family: RGB conversion after pad, resize and crop ------------------------------


def reference_transform(kind: str, dim: int, target_ratio: float = 1.25):
    """ABaldrati/CLIP4Cir src/data_utils.py targetpad_transform / squarepad_transform, rebuilt
    from torchvision's own functional pad (the reference's call), not from cir's classes."""
    import torchvision.transforms.functional as TF
    from torchvision import transforms as T

    def pad(image: Image.Image) -> Image.Image:
        w, h = image.size
        if kind == "squarepad":
            m = max(w, h)
            hp, vp = int((m - w) / 2), int((m - h) / 2)
        else:
            if max(w, h) / min(w, h) < target_ratio:
                return image
            s = max(w, h) / target_ratio
            hp, vp = max(int((s - w) / 2), 0), max(int((s - h) / 2), 0)
        return TF.pad(image, [hp, vp, hp, vp], 0, "constant")

    return T.Compose(
        [
            pad,
            T.Resize(dim, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(dim),
            lambda image: image.convert("RGB"),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


MODES = ["P", "CMYK", "RGBA", "L", "RGB"]


@pytest.mark.parametrize("kind", ["targetpad", "squarepad"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(120, 50), (50, 97), (70, 64)])
def test_pad_transforms_convert_after_crop_as_reference(
    kind: str, mode: str, size: tuple[int, int]
) -> None:
    image = noise_image(size, mode, seed=size[0] * 7 + size[1])
    ours = build_transform(kind, 48)(image.copy())
    reference = reference_transform(kind, 48)(image.copy())
    assert torch.equal(ours, reference), (mode, (ours - reference).abs().max())


@pytest.mark.parametrize("kind", ["targetpad", "squarepad"])
def test_convert_rgb_first_switch_changes_only_non_rgb_images(kind: str) -> None:
    for mode in MODES:
        image = noise_image((120, 50), mode, seed=3)
        reference = build_transform(kind, 48)(image.copy())
        first = build_transform(kind, 48, rgb="first")(image.copy())
        if mode in ("RGB", "L"):
            assert torch.equal(first, reference), mode
        else:
            assert (first - reference).abs().max() > 0.1, mode


def test_reference_pad_colours() -> None:
    """What the reference order does to the pad: palette entry 0 (red here), white for CMYK,
    black for RGBA; converting first always pads black."""
    black = (torch.zeros(3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    red = (torch.tensor([1.0, 0, 0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    white = (torch.ones(3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    cases = {"P": red, "CMYK": white, "RGBA": black}
    for mode, colour in cases.items():
        image = noise_image((120, 50), mode, seed=5)
        x = build_transform("targetpad", 80)(image)  # 120x96 padded, rows 0..22 are pad
        assert torch.allclose(x[:, 0, 40], colour, atol=1e-5), mode
        x = build_transform("targetpad", 80, rgb="first")(image)
        assert torch.allclose(x[:, 0, 40], black, atol=1e-5), mode


def test_image_files_keep_the_file_mode(tmp_path: Path) -> None:
    """Loading must not convert: the transform converts where the reference did."""
    image = noise_image((120, 50), "P", seed=9)
    image.save(tmp_path / "p.png")
    assert open_image(tmp_path / "p.png").mode == "P"
    transform = build_transform("targetpad", 48)
    _, x = ImageFiles([("p", tmp_path / "p.png")], transform)[0]
    expected = reference_transform("targetpad", 48)(Image.open(tmp_path / "p.png"))
    assert torch.equal(x, expected)


@pytest.mark.parametrize(
    ("recipe", "overrides", "expected"),
    [
        ("clip4cir_fiq", [], ("after_crop", "torchvision")),
        ("blip4cir_cirr", [], ("after_crop", "torchvision")),
        ("sprc_cirr", [], ("after_crop", "torchvision")),
        ("cala_blip2_cirr", [], ("after_crop", "torchvision")),
        ("cala_blip2_fiq", [], ("first", "torchvision")),  # CaLa's FashionIQ loader
        ("cala_clip_fiq", [], ("first", "torchvision")),
        ("lincir_large", [], ("first", "floor")),
        ("clip4cir_fiq", ["fixes.convert_rgb_first=true"], ("first", "torchvision")),
        ("lincir_large", ["fixes.torchvision_center_crop=true"], ("first", "torchvision")),
    ],
)
def test_recipes_pick_the_reference_preprocessing(
    recipe: str, overrides: list[str], expected: tuple[str, str]
) -> None:
    method = CIRMethod(load_recipe(recipe, overrides))
    assert method.preprocessing_options() == expected


def test_clip4cir_clip_transform_is_reachable_with_the_switches() -> None:
    """CLIP4Cir's `--transform clip` (OpenAI's preprocess: Resize, torchvision CenterCrop, RGB,
    ToTensor, Normalize) = `clip` with crop="torchvision" and rgb="after_crop" (README)."""
    from torchvision import transforms as T

    openai = T.Compose(
        [
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            lambda image: image.convert("RGB"),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    ours = build_transform("clip", 224, crop="torchvision", rgb="after_crop")
    for mode in ("P", "RGBA", "RGB"):
        image = noise_image((640, 427), mode, seed=11)
        assert torch.equal(ours(image.copy()), openai(image.copy())), mode
