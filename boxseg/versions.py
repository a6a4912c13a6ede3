"""The versions of Python and the libraries a result depends on, recorded with it."""

from __future__ import annotations

import importlib.metadata as md
import platform

PACKAGES = ("boxseg", "torch", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "pillow",
            "opencv-python-headless", "matplotlib")


def library_versions() -> dict[str, str]:
    v = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in PACKAGES:
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = "not installed"
    return v
