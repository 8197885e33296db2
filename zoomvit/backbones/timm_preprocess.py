"""timm's evaluation preprocessing, with its resize and crop as numbers for the geometry."""

from __future__ import annotations

import math

import torch


class TimmPreprocessor:
    """timm's evaluation transform (resize, centre crop, normalise) from a model's data config, as timm and
    transforms' TimmWrapperImageProcessor run it, plus the same resize and crop as numbers for the geometry.

    Cannot: 'border' crops (padding) and non-square inputs (timm keeps the ratio differently there); refused."""

    def __init__(self, data_config: dict):
        from timm.data import create_transform

        self.data_config = dict(data_config)
        _, height, width = self.data_config["input_size"]
        self.crop_mode = self.data_config.get("crop_mode") or "center"
        if height != width or self.crop_mode not in ("center", "squash"):
            raise ValueError(
                f"timm preprocessing with input size {height}x{width} and crop mode '{self.crop_mode}'; "
                "square inputs with 'center' or 'squash' crops only"
            )
        self.crop = height
        self.scale = math.floor(height / (self.data_config.get("crop_pct") or 0.875))
        self.transform = create_transform(**self.data_config, is_training=False)

    def __call__(self, images, return_tensors="pt"):
        images = images if isinstance(images, (list, tuple)) else [images]
        return {"pixel_values": torch.stack([self.transform(image.convert("RGB")) for image in images])}

    def resize_and_crop(self, width: int, height: int):
        """((width, height) after the resize, (left, top, width, height) of the crop), as torchvision computes them:
        the shortest edge (or, squashing, both) to `scale`, then a centre crop whose offset rounds half to even."""
        if self.crop_mode == "squash":
            resized = (self.scale, self.scale)
        elif width <= height:
            resized = (self.scale, int(self.scale * height / width))
        else:
            resized = (int(self.scale * width / height), self.scale)
        left = int(round((resized[0] - self.crop) / 2.0))
        top = int(round((resized[1] - self.crop) / 2.0))
        return resized, (left, top, self.crop, self.crop)
