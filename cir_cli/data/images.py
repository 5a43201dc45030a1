"""Load image files for feature extraction, failing loudly on a missing or corrupt file.

The seeds caught every exception in `__getitem__`, returned None and dropped it in the collate
function, which silently shrank batches and changed recall denominators (spec 1.3 and
weakness 11). Here any failure is a one-line CirError naming the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from cir_cli.errors import CirError


class ImageLoadError(CirError):
    """A missing or unreadable image file.

    A DataLoader worker's exception is re-raised in the main process as
    `type(exc)("Caught ... Original Traceback ...")`; this class keeps only the original one-line
    message (so the CLI prints one line) and the worker traceback in `worker_traceback`.
    """

    def __init__(self, message: str) -> None:
        self.worker_traceback = ""
        if "\n" in message:
            self.worker_traceback = message
            marker = f"{type(self).__name__}: "
            lines = [ln for ln in message.splitlines() if marker in ln]
            if lines:
                message = lines[-1].split(marker, 1)[1]
        super().__init__(message)


def open_rgb(path: Path) -> Image.Image:
    """Decode `path` fully into an RGB image and close the file; ImageLoadError on failure."""
    try:
        with Image.open(path) as im:
            # convert() decodes the pixels into a new image (a copy even for RGB input), so the
            # file is closed when the `with` ends and the result does not depend on it.
            return im.convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(f"image file {path} not found (run `cir prepare` to check)") from None
    except Exception as e:  # noqa: BLE001 - any decoder error means this file is unusable
        raise ImageLoadError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def open_image(path: Path) -> Image.Image:
    """Decode `path` fully in its own mode ('P', 'CMYK', 'RGBA', ...) and close the file.

    The transforms convert to RGB where the reference code did (after the crop for the pad
    transforms), so the mode must survive loading; ImageLoadError on failure.
    """
    try:
        with Image.open(path) as im:
            im.load()
            # copy() keeps mode and palette and detaches the pixels from the file.
            return im.copy()
    except FileNotFoundError:
        raise ImageLoadError(f"image file {path} not found (run `cir prepare` to check)") from None
    except Exception as e:  # noqa: BLE001 - any decoder error means this file is unusable
        raise ImageLoadError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


class ImageFiles(Dataset):
    """(name, path) pairs -> (index, transformed tensor), decoded in DataLoader workers.

    Returning the index (not the name) lets the default collate build a tensor batch and lets
    the caller write features into a preallocated array by position.
    """

    def __init__(
        self, files: Sequence[tuple[str, Path]], transform: Callable[[Image.Image], Any]
    ) -> None:
        self.files = list(files)
        self.transform = transform

    @classmethod
    def from_names(
        cls,
        names: Sequence[str],
        image_paths: Mapping[str, Path],
        transform: Callable[[Image.Image], Any],
    ) -> ImageFiles:
        """Files for `names` looked up in a split's `image_paths` (e.g. `split.image_names()`)."""
        return cls([(n, image_paths[n]) for n in names], transform)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        _, path = self.files[index]
        return index, self.transform(open_image(path))
