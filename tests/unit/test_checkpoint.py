"""Checkpoint files: atomic writes, retention, and refusing unsafe or incomplete checkpoints."""

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from mmfm.train.checkpoint import Checkpointer, CheckpointError


def tensors(seed=0):
    torch.manual_seed(seed)
    return {"model": torch.nn.Linear(4, 3).state_dict(), "rng": {"cpu": torch.get_rng_state()}}


def test_save_load_round_trip(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3)
    saved = tensors(seed=1)
    path = ckpt.save(5, saved, {"step": 5, "loader": {"x": [1, 2]}}, "model: {}\n")
    assert path.name == "step_5" and (path / "config.yaml").read_text() == "model: {}\n"
    target = tensors(seed=2)
    state = Checkpointer.load(path, target)
    assert state == {"step": 5, "loader": {"x": [1, 2]}}
    for name, value in saved["model"].items():
        assert torch.equal(target["model"][name], value)


def test_keeps_only_the_newest(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (10, 20, 30):
        ckpt.save(step, tensors(), {"step": step}, "")
    assert [p.name for p in ckpt.complete()] == ["step_20", "step_30"]
    assert ckpt.latest().name == "step_30"


def test_incomplete_directories_are_never_picked(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=5)
    ckpt.save(10, tensors(), {"step": 10}, "")
    (tmp_path / ".step_20.tmp").mkdir()  # a crashed write
    (tmp_path / "step_30").mkdir()  # a directory without train_state.json
    assert ckpt.latest().name == "step_10"
    with pytest.raises(CheckpointError, match="not a complete mmfm checkpoint"):
        Checkpointer.load(tmp_path / "step_30", tensors())


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_metadata_is_refused_and_not_executed(tmp_path):
    path = Checkpointer(tmp_path, keep=1).save(1, tensors(), {"step": 1}, "")
    exploit = _Exploit()
    exploit.marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(exploit))
    with pytest.raises(CheckpointError, match=r"refers to (posix|os)\.system; refusing"):
        Checkpointer.load(path, tensors())
    assert not exploit.marker.exists()


def test_non_tensor_entries_are_refused(tmp_path):
    # DCP would torch.load(weights_only=False) a non-tensor entry; mmfm keeps those in JSON.
    path = tmp_path / "step_1"
    dcp.save({"model": {"w": torch.zeros(2)}, "blob": {"a": 1}}, checkpoint_id=path)
    (path / "train_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"entry 'blob\.a' is not a tensor"):
        Checkpointer.load(path, {"model": {"w": torch.ones(2)}})
