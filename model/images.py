"""Images of a manifest as preprocessed tensors (PIL + open_clip's eval transform)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset


class ImageDataset(Dataset):
    def __init__(self, paths: Sequence[str], preprocess: Callable[[Image.Image], torch.Tensor]) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            return self.preprocess(image.convert("RGB"))

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([self[int(i)] for i in indices])
