"""AOTInductor packages (.pt2): loaded with torch alone (torch._inductor.aoti_load_package)."""

from __future__ import annotations

from pathlib import Path

import torch

from boxseg.errors import DataError
from boxseg.predict.base import Predictor


class AotiPredictor(Predictor):
    """A package compiled for one device and dtype. A package built with a static batch
    (boxseg-export's default) gets inputs padded or split to that batch."""

    backend = "aoti"
    reuses_outputs = True  # not promised otherwise by the package API: copied before the next run

    def __init__(self, path: Path, meta: dict, device: torch.device, precision: str, batch: int = 64):
        super().__init__(meta, device, precision, batch)
        path = Path(path)
        built = meta.get("precision", "fp32")
        if built != precision:
            raise DataError(path, f"this AOTInductor package was compiled for {built}, not {precision}; "
                                  f"export another with{'' if precision == 'fp16' else 'out'} --fp16")
        if meta.get("device") not in (None, self.device.type):
            raise DataError(path, f"this AOTInductor package was compiled for {meta.get('device')}, not {self.device.type}")
        try:
            self.runner = torch._inductor.aoti_load_package(str(path))
        except Exception as e:  # the loader raises RuntimeError and others
            raise DataError(path, f"cannot load the AOTInductor package: {str(e).splitlines()[0]}") from None
        self.static_batch = meta.get("static_batch")
        self.max_batch = int(self.static_batch or meta.get("max_batch") or 0) or None
        # the layout the package was compiled for (it does not check strides); older packages: contiguous
        fmt = meta.get("input_memory_format", "contiguous")
        self.memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        self.settings["memory_format"] = fmt
        self.provider = meta.get("device")

    def padded_size(self, n: int) -> int:
        return int(self.static_batch) if self.static_batch else n

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner(x.to(self.device, self.dtype).contiguous(memory_format=self.memory_format))
