"""Checkpoint files: atomic writes, retention, and refusing unsafe or incomplete checkpoints."""

import errno
import gc
import os
import pickle
import pickletools
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem as dcp_filesystem

from mmfm.train import checkpoint as checkpoint_module
from mmfm.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    DamagedCheckpointError,
    UnsafeCheckpointError,
)


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
    (path / "COMPLETE").write_text("1\n")
    with pytest.raises(UnsafeCheckpointError, match=r"entry 'blob\.a' is not a tensor"):
        Checkpointer.load(path, {"model": {"w": torch.ones(2)}})


# -- damaged files: one line naming the file (issue 14, defect 10) ---------------------------


def _saved(tmp_path, step=1, seed=1):
    return Checkpointer(tmp_path, keep=3).save(step, tensors(seed), {"step": step}, "")


def _garbage(path):
    path.write_bytes(os.urandom(path.stat().st_size))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: _garbage(p / "__0_0.distcp"), r"__0_0\.distcp is not readable DCP tensor data"),
        (lambda p: _truncate(p / "__0_0.distcp"), r"__0_0\.distcp is truncated \(\d+ bytes"),
        (lambda p: (p / "__0_0.distcp").unlink(), r"__0_0\.distcp is missing"),
        (lambda p: _garbage(p / ".metadata"), r"\.metadata is not readable DCP metadata"),
        (lambda p: _truncate(p / ".metadata"), r"\.metadata is not readable DCP metadata"),
        (lambda p: (p / "train_state.json").write_text('{"step": 1'), r"state\.json is not readab"),
        (lambda p: (p / "train_state.json").write_text("[1, 2]"), r"holds a list, not an object"),
        (lambda p: (p / "train_state.json").write_bytes(b"\xff\xfe"), r"is not readable JSON"),
    ],
    ids=[
        "garbage_distcp",
        "truncated_distcp",
        "missing_distcp",
        "garbage_metadata",
        "truncated_metadata",
        "truncated_state",
        "list_state",
        "binary_state",
    ],
)
def test_damage_is_one_line_naming_the_file(tmp_path, damage, message):
    path = _saved(tmp_path)
    damage(path)
    with pytest.raises(DamagedCheckpointError, match=message) as info:
        Checkpointer.load(path, tensors())
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_load_model_names_a_damaged_data_file(tmp_path):
    path = _saved(tmp_path)
    _garbage(path / "__0_0.distcp")
    with pytest.raises(DamagedCheckpointError, match=r"__0_0\.distcp is not readable"):
        Checkpointer.load_model(path, tensors()["model"])


def test_a_data_file_outside_the_checkpoint_is_refused(tmp_path):
    path = _saved(tmp_path)
    raw = (path / ".metadata").read_bytes()
    name = b"__0_0.distcp"
    evil = b"../../x.distcp"
    patched = raw.replace(b"\x8c" + bytes([len(name)]) + name, b"\x8c" + bytes([len(evil)]) + evil)
    (path / ".metadata").write_bytes(pickletools.optimize(patched))
    with pytest.raises(UnsafeCheckpointError, match=r"'\.\./\.\./x\.distcp' lies outside"):
        Checkpointer.load(path, tensors())


def test_a_different_model_is_named_before_dcp_runs(tmp_path):
    path = _saved(tmp_path)
    wider = {"model": torch.nn.Linear(5, 3).state_dict(), "rng": tensors()["rng"]}
    with pytest.raises(CheckpointError, match=r"weight has shape \(3, 4\) there, \(3, 5\) here"):
        Checkpointer.load(path, wider)
    fewer = {"model": {"weight": torch.zeros(3, 4)}, "rng": tensors()["rng"]}
    with pytest.raises(CheckpointError, match=r"model\.bias is not in this model"):
        Checkpointer.load(path, fewer, whole_model=True)
    Checkpointer.load(path, fewer)  # one pipeline stage's share of the model
    more = tensors()
    more["model"]["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"model\.extra is not in the checkpoint"):
        Checkpointer.load(path, more)


def test_a_different_optimizer_is_named_before_dcp_runs(tmp_path):
    path = _saved(tmp_path)
    with_optim = {**tensors(), "optim": {"state.weight.momentum_buffer": torch.zeros(3, 4)}}
    with pytest.raises(CheckpointError, match=r"the optimizer differs: .*train\.init_from="):
        Checkpointer.load(path, with_optim)


# -- disk full while saving ---------------------------------------------------------------------


def _disk_full_in_dcp(monkeypatch):
    real = dcp_filesystem._write_item

    def write_then_fail(*args, **kwargs):
        real(*args, **kwargs)  # part of the data is on disk when the device fills up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dcp_filesystem, "_write_item", write_then_fail)


def _disk_full_in_state(monkeypatch):
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "train_state.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("fill", [_disk_full_in_dcp, _disk_full_in_state])
def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fill):
    ckpt = Checkpointer(tmp_path, keep=1)
    saved = tensors(seed=1)
    ckpt.save(1, saved, {"step": 1}, "")
    fill(monkeypatch)
    with pytest.raises(CheckpointError, match=r"no space left .*/step_1 is intact") as info:
        ckpt.save(2, tensors(seed=2), {"step": 2}, "")
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step_1"]  # and no half-written step_2
    target = tensors(seed=3)
    assert Checkpointer.load(tmp_path / "step_1", target) == {"step": 1}
    for name, value in saved["model"].items():
        assert torch.equal(target["model"][name], value)


# -- the completion marker ----------------------------------------------------------------------


def test_a_checkpoint_without_its_marker_is_not_complete(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=5)
    for step in (1, 2):
        ckpt.save(step, tensors(), {"step": step}, "")
    (tmp_path / "step_2" / "COMPLETE").unlink()  # what an interrupted prune leaves
    assert ckpt.latest().name == "step_1"
    with pytest.raises(CheckpointError, match=r"step_2 has no COMPLETE marker"):
        Checkpointer.load(tmp_path / "step_2", tensors())


def test_pruning_removes_the_marker_first(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, keep=1)
    ckpt.save(1, tensors(), {"step": 1}, "")
    real_rmtree, seen = checkpoint_module.shutil.rmtree, []

    def crash_mid_removal(path, *args, **kwargs):
        if Path(path).name == "step_1":
            seen.append((Path(path) / "COMPLETE").exists())
            (Path(path) / "__0_0.distcp").unlink()  # part removed, then the crash
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", crash_mid_removal)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2, tensors(), {"step": 2}, "")
    assert seen == [False]
    monkeypatch.undo()
    assert [p.name for p in ckpt.complete()] == ["step_2"]
    ckpt.save(3, tensors(), {"step": 3}, "")  # the next prune removes the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3"]


# -- background saves (checkpoint.async_save) -----------------------------------------------


def _live_tensors() -> int:
    gc.collect()
    return sum(type(o) is torch.Tensor for o in gc.get_objects())


def test_background_saves_complete_at_finish_and_hold_no_copies_after(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    live = {"model": {"w": torch.zeros(1 << 16)}}
    counts = {}
    for step in range(1, 5):
        path = ckpt.save(step, live, {"step": step}, "", background=True)
        live["model"]["w"].fill_(-1.0)  # the staged copy is the step's, not this
        assert ckpt.in_flight == path and not (path / "COMPLETE").exists()
        ckpt.finish()  # also what the next save does first
        assert ckpt.in_flight is None and ckpt.latest() == path
        target = tensors()
        target["model"] = {"w": torch.ones(1 << 16)}
        del target["rng"]
        Checkpointer.load(path, target)
        assert torch.equal(target["model"]["w"], torch.full((1 << 16,), float(step - 1)))
        live["model"]["w"].fill_(float(step))
        del target
        if step in (2, 4):
            counts[step] = _live_tensors()
    assert [p.name for p in ckpt.complete()] == ["step_3", "step_4"]
    assert counts[4] <= counts[2], counts  # staged copies are freed: no growth per save
