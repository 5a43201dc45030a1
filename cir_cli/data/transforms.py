"""Image preprocessing of CLIP4Cir / BLIP4CIR (spec section 2), with RGB conversion moved first.

The seeds pad before converting to RGB, so the 0 fill of a palette ('P') image is palette
entry 0 and an RGBA pad is transparent-then-dropped, i.e. not necessarily black (spec
weakness 23). Here every image is converted to RGB before padding, so the pad is always black.
Everything else (integer arithmetic, bicubic shorter-side resize, centre crop, CLIP
normalisation) follows the spec exactly. torch/torchvision are imported only when a transform
is built, to keep `cir --help` fast.
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
    # fill 0 is black for RGB/L; callers convert to RGB first so it never means a palette entry.
    return ImageOps.expand(image, border=(horizontal, vertical, horizontal, vertical), fill=0)


class SquarePad:
    """Pad both sides of the shorter dimension with black towards a square.

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


def build_transform(
    kind: str,
    size: int,
    target_ratio: float = DEFAULT_TARGET_RATIO,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised float tensor (3, size, size).

    Order: to RGB -> pad (targetpad / squarepad; none for clip) -> Resize(size, bicubic, on
    the shorter side) -> CenterCrop(size) -> ToTensor -> Normalize(mean, std).
    """
    if kind not in TRANSFORMS:
        raise CirError(f"unknown transform '{kind}'; expected one of {', '.join(TRANSFORMS)}")
    if size <= 0:
        raise CirError(f"transform size must be positive, got {size}")
    from torchvision import transforms as T

    steps: list[Callable] = [to_rgb]
    if kind == "targetpad":
        steps.append(TargetPad(target_ratio))
    elif kind == "squarepad":
        steps.append(SquarePad())
    steps += [
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(tuple(mean), tuple(std)),
    ]
    return T.Compose(steps)
