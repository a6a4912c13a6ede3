"""SegNet1 (DeepLab-v1 LargeFOV on VGG16) and SegNet2 (Hourglass binary segmenter)."""
