"""Checkpoints: written atomically, read with `weights_only=True` (never unpickling code)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from boxseg.data.files import atomic_path
from boxseg.errors import DataError


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temp file beside `path`, fsync, rename: a kill leaves the old file intact."""
    with atomic_path(Path(path)) as tmp:
        torch.save(state, tmp)


def load_state_file(path: Path) -> dict:
    """Load a checkpoint or state dict. Only tensors and plain containers are accepted: a file
    whose pickle would build other objects (and so could run code) is refused, with no
    fallback to `weights_only=False`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "checkpoint file is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):
            raise DataError(path, "cannot read checkpoint: not a torch checkpoint archive (corrupt, truncated "
                                  "or another format)") from None
        raise DataError(path, f"refused: not a plain weights file (weights_only load failed: {str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise DataError(path, f"cannot read checkpoint: {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - garbage read as a legacy pickle fails in many ways (IndexError,
        # KeyError, UnicodeDecodeError, ...: ~8% of random 4 KiB files); it is bad input, not a crash
        if not zipfile.is_zipfile(path):
            raise DataError(path, "cannot read checkpoint: not a torch checkpoint archive (corrupt, truncated "
                                  "or another format)") from None
        raise DataError(path, f"cannot read checkpoint: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(state, dict):
        raise DataError(path, f"checkpoint holds a {type(state).__name__}, expected a dict")
    return state
