"""A uniform view of VOC and COCO datasets for training and inference: id, image, boxes,
labels and (when present) the ground-truth label map; optionally cached in memory."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Item:
    id: str
    image: np.ndarray          # uint8 (H, W, 3)
    boxes: np.ndarray          # float32 (N, 4)
    labels: np.ndarray         # int64 (N,)
    mask: np.ndarray | None    # uint8 (H, W) ground truth, if any


class ImageSet:
    """Wraps a VOCDataset or COCOSource. `cache=True` keeps decoded items (small worlds)."""

    def __init__(self, dataset, num_classes: int, cache: bool = False):
        self.dataset = dataset
        self.num_classes = num_classes
        self._cache: dict[int, Item] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.dataset)

    def id(self, i: int) -> str:
        if hasattr(self.dataset, "ids"):
            return self.dataset.ids[i]
        return f"{int(self.dataset.images[i]['id']):012d}"

    def __getitem__(self, i: int) -> Item:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        s = self.dataset[i]
        item = Item(self.id(i), s.image, s.boxes, s.labels, s.mask)
        if self._cache is not None:
            self._cache[i] = item
        return item

    def boxed(self, i: int, encoded_jpeg: bool = False) -> Item:
        """Item i with its image and boxes but without decoding its ground truth (mask None),
        where the dataset can skip it: what proposal generation needs. With `encoded_jpeg`,
        where the dataset can, a plain JPEG image comes undecoded (`EncodedJpeg`)."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        if not hasattr(self.dataset, "boxed"):
            return self[i]
        s = self.dataset.boxed(i, encoded_jpeg=encoded_jpeg)
        return Item(self.id(i), s.image, s.boxes, s.labels, None)

    def ground_truth(self, i: int) -> np.ndarray | None:
        """Item i's ground-truth label map (None if it has none) without decoding its image,
        where the dataset can: what scoring a folder of label maps needs."""
        if self._cache is not None and i in self._cache:
            return self._cache[i].mask
        if not hasattr(self.dataset, "ground_truth"):
            return self[i].mask
        return self.dataset.ground_truth(i)

    def class_pairs(self) -> list[tuple[int, int]]:
        """(index, class) for every class with a box in an image, without decoding images."""
        if hasattr(self.dataset, "class_pairs"):
            return self.dataset.class_pairs()
        return [(i, int(c)) for i in range(len(self)) for c in sorted(set(self.dataset.annotation(i).labels.tolist()))]
