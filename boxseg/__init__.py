"""boxseg: semantic segmentation from bounding boxes (box-supervised SegNet1/SegNet2)."""

__version__ = "0.1.0"
