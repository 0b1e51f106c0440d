"""torch Datasets over a site's preprocessed arrays (``fedscan.common.data.site_arrays.SiteData``).

``SliceDataset`` serves a slice and its mask, ``ImageDataset`` an image and its class and
``ExamDataset`` all images of an exam and its class.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from fedscan.common.data.site_arrays import SiteData


def _image(data: SiteData, j: int) -> torch.Tensor:
    return torch.from_numpy(np.array(data.images[j], dtype=np.float32))[None]


class SliceDataset(Dataset):
    """2D slices and masks as tensors: x (1, H, W) float, y (1, H, W) long."""

    def __init__(self, data: SiteData, indices: np.ndarray) -> None:
        if data.masks is None:
            raise ValueError("this site's data has no segmentation masks")
        self.data = data
        self.indices = np.asarray(indices)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = int(self.indices[i])
        y = torch.from_numpy(np.array(self.data.masks[j], dtype=np.int64))[None]  # type: ignore[index]  # __init__ checked masks
        return _image(self.data, j), y


class ImageDataset(Dataset):
    """Single labelled images: x (1, H, W) float and its class. Samples must be one image each."""

    def __init__(self, data: SiteData, samples: np.ndarray) -> None:
        slices = data.slices_of()
        self.samples = np.asarray(samples)
        if any(len(slices[k]) != 1 for k in self.samples):
            raise ValueError("ImageDataset needs samples of one image each")
        self.data = data
        self.slice_of = np.array([slices[k][0] for k in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.samples.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return _image(self.data, int(self.slice_of[i])), int(self.data.target[self.samples[i]])  # type: ignore[index]  # labelled data


class ExamDataset(Dataset):
    """Whole exams: x (n_images, 1, H, W) in geometric order, and the exam's class."""

    def __init__(self, data: SiteData, samples: np.ndarray) -> None:
        self.data = data
        self.samples = np.asarray(samples)
        self.slices = data.slices_of()

    def __len__(self) -> int:
        return int(self.samples.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        k = int(self.samples[i])
        idx = self.slices[k]
        x = torch.from_numpy(np.array(self.data.images[idx], dtype=np.float32))[:, None]
        return x, int(self.data.target[k])  # type: ignore[index]  # slices_of() checked labels
