"""Errors for bad input and the record of what `--skip-bad` skipped."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class DataError(Exception):
    """Bad input: names the file and the problem.

    Raised for corrupt images, label PNGs with unexpected values, invalid boxes, malformed
    XML/JSON, missing files and paths escaping the dataset root.
    """

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # survives the trip back from a DataLoader worker
        return (DataError, (self.path, self.problem))


class NoSpace(OSError):
    """The disk is full: names the file being written. Everything written before stays whole
    (atomic writes), and the same command resumes once there is room."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        super().__init__(28, f"no space left on device while writing {self.path}")

    def __reduce__(self):
        return (NoSpace, (self.path,))


class NonFiniteOutput(RuntimeError):
    """A network gave NaN or infinite outputs (fp16 overflow, broken weights): nothing is
    scored or written from them."""

    def __init__(self, ids: list[str], precision: str):
        self.ids = list(ids)
        super().__init__(f"non-finite network output at {precision} for {len(ids)} image(s) "
                         f"({', '.join(self.ids[:5])}{' ...' if len(ids) > 5 else ''}); overflow? "
                         f"try --precision fp32 or bf16. No score is reported from these outputs.")


@dataclass
class BadInputLog:
    """What was skipped under `--skip-bad`, and what was repaired (clipped boxes)."""

    skipped: list[dict] = field(default_factory=list)
    clipped: dict[str, int] = field(default_factory=dict)   # annotation file -> boxes clipped in it

    def skip(self, err: DataError, item: str | None = None) -> None:
        self.skipped.append({"item": item, "path": err.path, "problem": err.problem})

    def clip(self, path: str | Path, n: int) -> None:
        """Record that `n` boxes of `path` were clipped to the image (once per file, however
        many split lists name it)."""
        if n:
            self.clipped[str(path)] = n

    @property
    def clipped_boxes(self) -> int:
        return sum(self.clipped.values())

    def to_dict(self) -> dict:
        return {
            "skipped_count": len(self.skipped),
            "skipped": list(self.skipped),
            "clipped_boxes": self.clipped_boxes,
            "clipped_files": dict(self.clipped),
        }

    def summary(self) -> str:
        lines = [f"skipped {len(self.skipped)} bad input(s); clipped {self.clipped_boxes} box(es)"]
        lines += [f"  {s['path']}: {s['problem']}" for s in self.skipped]
        return "\n".join(lines)
