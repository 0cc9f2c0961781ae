"""Images of a manifest as preprocessed tensors (PIL + open_clip's eval transform)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from model.augment import ViewPlan, apply_view


class ImageDataset(Dataset):
    """Item i: (preprocessed image, "") or, for a file PIL cannot decode, (zeros, the reason).
    The reason travels with the batch instead of raising inside a loader worker, whose
    re-raised traceback would bury the file name; the caller names the manifest rows."""

    def __init__(self, paths: Sequence[str], preprocess: Callable[[Image.Image], torch.Tensor],
                 views: ViewPlan | None = None) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess
        self.views = views  # item i: path i in view views[i]; None: as it is

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        try:
            with Image.open(self.paths[index]) as image:
                image = image.convert("RGB")
            return self.preprocess(image if self.views is None else apply_view(image, self.views[index])), ""
        except (OSError, ValueError, SyntaxError) as err:  # unidentified, truncated, corrupt: PIL raises all three
            return torch.zeros(self.preprocess(Image.new("RGB", (8, 8))).shape), f"{type(err).__name__}: {err}"

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
        items = [self[int(i)] for i in indices]
        return torch.stack([t for t, _ in items]), [reason for _, reason in items]
