"""Image preprocessing of CLIP4Cir / BLIP4CIR / SPRC / CaLa (spec section 2) and LinCIR.

Reference order of the pad transforms (CLIP4Cir `data_utils.py`, copied by Bi-BLIP4CIR, SPRC
and CaLa): pad -> Resize(size, bicubic, shorter side) -> CenterCrop(size) -> **convert to RGB**
-> ToTensor -> Normalize. Padding and resizing therefore happen in the file's own mode: a
palette ('P') image is padded with palette entry 0 and resized with NEAREST (PIL's rule for
'P'), a CMYK image is padded with CMYK 0 (white once converted), an RGBA image is resized with
premultiplied alpha and its transparent pad is dropped to black. This is the default
(`rgb="after_crop"`); `rgb="first"` converts before padding (always a black pad), the
`fixes.convert_rgb_first` switch. RGB and L images give the same pixels either way.

`clip` is the CLIPImageProcessor pipeline LinCIR uses: convert to RGB first, shorter side to
`size` (PIL bicubic), centre crop at floor((side - size) / 2), rescale, normalise. torchvision's
CenterCrop rounds that offset half-to-even instead, one pixel off whenever side - size is 3
mod 4 (e.g. 640x427 at 224); `crop="torchvision"` (the `fixes.torchvision_center_crop` switch)
keeps that. torch/torchvision are imported only when a transform is built, to keep `cir --help`
fast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from PIL import Image, ImageOps

from cir_cli.errors import CirError

if TYPE_CHECKING:
    import torch

# CLIP's normalisation; BLIP's official transforms use the same constants.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRANSFORMS = ("targetpad", "squarepad", "clip")
DEFAULT_TARGET_RATIO = 1.25


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image` (unchanged object if already RGB); alpha is dropped, not composited."""
    return image if image.mode == "RGB" else image.convert("RGB")


def _pad(image: Image.Image, horizontal: int, vertical: int) -> Image.Image:
    if horizontal == 0 and vertical == 0:
        return image
    # fill 0 in the image's own mode: black for RGB/L, palette entry 0 for 'P', white once
    # converted for CMYK, transparent black for RGBA (the reference pads before converting).
    return ImageOps.expand(image, border=(horizontal, vertical, horizontal, vertical), fill=0)


class SquarePad:
    """Pad both sides of the shorter dimension with 0 (black in RGB) towards a square.

    hp = int((m - w) / 2), vp = int((m - h) / 2) with m = max(w, h): an odd difference leaves
    the result 1 px short of square, which the centre crop absorbs (as in the seeds).
    """

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        m = max(w, h)
        # Both differences are >= 0, so floor division equals the seeds' int() truncation.
        return _pad(image, (m - w) // 2, (m - h) // 2)

    def __repr__(self) -> str:
        return "SquarePad()"


class TargetPad:
    """Pad the shorter side so the aspect ratio drops to about `target_ratio`.

    Images with max/min side ratio below `target_ratio` are returned unchanged. Otherwise,
    with S = max(w, h) / target_ratio: hp = max(int((S - w) / 2), 0), vp = max(int((S - h) / 2),
    0) (float S, int() truncating toward zero, as in the seeds). 1000x500 at 1.25 -> 1000x800.
    """

    def __init__(self, target_ratio: float = DEFAULT_TARGET_RATIO) -> None:
        if target_ratio <= 0:
            raise CirError(f"target_ratio must be positive, got {target_ratio}")
        self.target_ratio = target_ratio

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if min(w, h) == 0:
            raise CirError(f"cannot pad an empty image of size {w}x{h}")
        if max(w, h) / min(w, h) < self.target_ratio:
            return image
        s = max(w, h) / self.target_ratio
        return _pad(image, max(int((s - w) / 2), 0), max(int((s - h) / 2), 0))

    def __repr__(self) -> str:
        return f"TargetPad(target_ratio={self.target_ratio})"


class FloorCenterCrop:
    """Centre crop to `size` x `size` with the offset floor((side - size) / 2) on each axis, as
    transformers' CLIPImageProcessor (torchvision's CenterCrop rounds half to even)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        # A side shorter than `size` cannot occur after the shorter-side resize; PIL would fill
        # it with 0 as CLIPImageProcessor's padding does.
        return image.crop((left, top, left + self.size, top + self.size))

    def __repr__(self) -> str:
        return f"FloorCenterCrop(size={self.size})"


RGB_ORDERS = ("auto", "first", "after_crop")
CROPS = ("auto", "floor", "torchvision")


def resolve_rgb_order(kind: str, rgb: str = "auto") -> str:
    """'first' or 'after_crop': "auto" is the reference of `kind` (CLIPImageProcessor converts
    first; the pad transforms of the CLIP4Cir family convert after the crop)."""
    if rgb not in RGB_ORDERS:
        raise CirError(f"unknown RGB conversion order '{rgb}'; expected one of {RGB_ORDERS}")
    if rgb != "auto":
        return rgb
    return "first" if kind == "clip" else "after_crop"


def resolve_crop(kind: str, crop: str = "auto") -> str:
    """'floor' or 'torchvision': "auto" is floor for `clip` (CLIPImageProcessor), torchvision's
    CenterCrop for the pad transforms (the CLIP4Cir family's)."""
    if crop not in CROPS:
        raise CirError(f"unknown centre crop '{crop}'; expected one of {CROPS}")
    if crop != "auto":
        return crop
    return "floor" if kind == "clip" else "torchvision"


def build_transform(
    kind: str,
    size: int,
    target_ratio: float = DEFAULT_TARGET_RATIO,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    rgb: str = "auto",
    crop: str = "auto",
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image (any mode) -> normalised float tensor (3, size, size).

    Order: [to RGB if rgb="first"] -> pad (targetpad / squarepad; none for clip) ->
    Resize(size, bicubic, on the shorter side) -> centre crop -> [to RGB if rgb="after_crop"]
    -> ToTensor -> Normalize(mean, std). "auto" picks the reference of `kind` for both the
    RGB order and the crop (see the module docstring).
    """
    if kind not in TRANSFORMS:
        raise CirError(f"unknown transform '{kind}'; expected one of {', '.join(TRANSFORMS)}")
    if size <= 0:
        raise CirError(f"transform size must be positive, got {size}")
    rgb = resolve_rgb_order(kind, rgb)
    crop = resolve_crop(kind, crop)
    from torchvision import transforms as T

    steps: list[Callable] = [to_rgb] if rgb == "first" else []
    if kind == "targetpad":
        steps.append(TargetPad(target_ratio))
    elif kind == "squarepad":
        steps.append(SquarePad())
    steps += [
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        FloorCenterCrop(size) if crop == "floor" else T.CenterCrop(size),
    ]
    if rgb == "after_crop":
        steps.append(to_rgb)
    steps += [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
    return T.Compose(steps)


# The public surface (README "Python API"); tests/test_public_api.py imports each name.
__all__ = [
    "build_transform",
]
