"""Trainers for SegNet1 and SegNet2, the alternating scheme, checkpoints and DDP helpers."""
