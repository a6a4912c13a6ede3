"""Training stages: atomic checkpoints, resume to bitwise-equal weights, NaN stop, hostile files."""

import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from boxseg.errors import DataError
from boxseg.models.checkpoint import load_state_file, save_checkpoint
from boxseg.train.loop import KeySampler, Stage, TrainingDiverged, run_stage


class Toy(Dataset):
    """Sample `key` is a pure function of the key."""

    def __len__(self):
        return 10

    def __getitem__(self, key):
        rng = np.random.default_rng([0, key])
        x = torch.from_numpy(rng.normal(size=(8,)).astype(np.float32))
        return {"x": x, "y": x.sum().reshape(1) * 0.5}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))


def _step(model, batch):
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def _train(dir, iters=12, every=4, lr=0.05, stop_after=None):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    stage = Stage("toy", dir, iters, 4, every)
    calls = {"n": 0}

    def killed_step(model, batch):  # simulate a kill right after iteration `stop_after`
        if calls["n"] == stop_after:
            raise KeyboardInterrupt
        calls["n"] += 1
        return _step(model, batch)
    step = _step if stop_after is None else killed_step
    return run_stage(stage, model, opt, Toy(), step, seed=1, device=torch.device("cpu"), log=lambda s: None)


def test_resume_after_kill_gives_bitwise_same_weights(tmp_path):
    ref = _train(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "run", stop_after=6)  # killed after iteration 6; last checkpoint at 4
    assert (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "final.pt").exists()
    assert load_state_file(tmp_path / "run" / "last.pt")["iteration"] == 4
    resumed = _train(tmp_path / "run")
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert not (tmp_path / "run" / "last.pt").exists()
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 13 and rows[-1].startswith("12,")  # no duplicated rows after resume
    seconds = [float(r.split(",")[3]) for r in rows[1:]]
    assert seconds == sorted(seconds)  # cumulative over the resume, not restarting from 0


def test_progress_lines_without_a_terminal(tmp_path):
    lines = []
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    stage = Stage("toy", tmp_path / "s", 6, 4, 3, position=(2, 5))
    run_stage(stage, model, opt, Toy(), _step, seed=1, device=torch.device("cpu"), progress=False, log=lines.append)
    assert lines[0] == "[stage 2/5 toy] 6 iterations"
    assert lines[-1].startswith("[stage 2/5 toy] iteration 6/6, loss ") and " it/s, ETA 0 s" in lines[-1]


def test_finished_stage_is_reused(tmp_path):
    a = _train(tmp_path / "s")
    mtime = os.path.getmtime(tmp_path / "s" / "final.pt")
    b = _train(tmp_path / "s")
    assert os.path.getmtime(tmp_path / "s" / "final.pt") == mtime
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_nan_loss_stops_with_message_and_keeps_last_good(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at iteration \d+.*Last good checkpoint: .*last\.pt"):
        _train(tmp_path / "nan", iters=200, every=2, lr=1e6)
    state = load_state_file(tmp_path / "nan" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_key_sampler_shards_cover_the_single_process_keys():
    single = list(KeySampler(3, 6, 8))
    shards = [list(KeySampler(3, 6, 8, rank=r, world=2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == single
    assert single[:8] == list(range(24, 32))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil()}, path)
    with pytest.raises(DataError, match=r"evil\.pt: refused: not a plain weights file"):
        load_state_file(path)
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(DataError, match="refused|cannot read"):
        load_state_file(tmp_path / "raw.pkl")
    with pytest.raises(DataError, match="checkpoint file is missing"):
        load_state_file(tmp_path / "nope.pt")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"a": torch.ones(2)})

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, {"a": torch.zeros(2)})
    assert torch.equal(load_state_file(path)["a"], torch.ones(2))  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]         # no temp file left behind
