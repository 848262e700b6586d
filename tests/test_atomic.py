"""The atomic writer behind checkpoints, results, weights and prediction CSVs: a failed write
leaves the old file and no temporary file; two writers of one file never share a temporary file."""
import os
import threading

import pytest
import torch

from osteo.atomic import AtomicFile, atomic_write, write_text_atomic
from osteo.training import TrainResult, save_checkpoint


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("mode,old,half", [("w", "old text", "half of the new"), ("wb", b"old bytes", b"\x00" * 4096)])
def test_a_write_failing_midway_leaves_the_old_file_and_nothing_else(tmp_path, mode, old, half):
    target = tmp_path / "out.dat"
    (target.write_text if mode == "w" else target.write_bytes)(old)
    with pytest.raises(RuntimeError, match="disk gone"):
        with atomic_write(target, mode) as fh:
            fh.write(half)
            fh.flush()
            raise RuntimeError("disk gone")
    assert (target.read_text() if mode == "w" else target.read_bytes()) == old
    assert _files(tmp_path) == ["out.dat"]


def test_a_failed_write_of_a_new_file_leaves_no_file(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(tmp_path / "new.json") as fh:
            fh.write("{")
            raise KeyboardInterrupt
    assert _files(tmp_path) == []


def test_checkpoint_that_cannot_be_pickled_midway_leaves_the_old_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})
    with pytest.raises(Exception):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(1000), "bad": lambda: None})  # fails after the tensor
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert _files(tmp_path) == ["checkpoint.pt"]


def test_two_writers_of_one_file_do_not_collide(tmp_path):
    target = tmp_path / "result.json"
    a, b = AtomicFile(target), AtomicFile(target)
    assert a.tmp != b.tmp and a.tmp.parent == b.tmp.parent == tmp_path
    a.file.write("A" * 10000)
    b.file.write("B" * 20)
    a.file.write("A")
    b.commit()
    assert target.read_text() == "B" * 20
    a.commit()
    assert target.read_text() == "A" * 10001  # the last to finish wins, whole
    assert _files(tmp_path) == ["result.json"]


def test_threads_writing_one_result_each_leave_one_whole_file(tmp_path):
    target = tmp_path / "result.json"
    texts = [str(i) * (1000 + 37 * i) for i in range(8)]
    errors = []

    def write(t):
        try:
            for _ in range(20):
                write_text_atomic(target, t)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert target.read_text() in texts
    assert _files(tmp_path) == ["result.json"]


def test_committed_file_gets_the_permissions_open_would_give(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    path = write_text_atomic(tmp_path / "x.txt", "x")
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_train_result_to_json_is_atomic(tmp_path, monkeypatch):
    res = TrainResult(config={}, history=[], test={}, main_head="f", y_true=[], predictions={}, alpha=None,
                      pretrained_used=False, device="cpu", seconds=0.0)
    path = tmp_path / "result.json"
    res.to_json(path)
    assert TrainResult.from_json(path) == res
    import osteo.atomic as A

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(A.os, "replace", broken_replace)
    with pytest.raises(OSError):
        TrainResult(**{**res.__dict__, "main_head": "main"}).to_json(path)
    assert TrainResult.from_json(path) == res and _files(tmp_path) == ["result.json"]
