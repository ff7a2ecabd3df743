"""Attacks through a checkpoint, and damaged checkpoints (issue 14, defects 1 and 10).

Every attack pickle below runs a shell command that writes a marker file when unpickled
without restrictions (`test_the_attacks_are_real` shows it). Every path that loads a
checkpoint must refuse each of them with a `CheckpointError` and leave no marker. A damaged
checkpoint is one line naming the file; `resume=auto` falls back past it, never past an
unsafe one.
"""

from __future__ import annotations

import errno
import os
import pathlib
import pickle
import pickletools
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import filesystem as dcp_filesystem

from mmfm.cli import main as cli
from mmfm.config import load_config
from mmfm.testing import read_metrics
from mmfm.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint_model,
)
from mmfm.train.command import train

from helpers import TINY

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_sec_checkpoint")

REPO = Path(__file__).resolve().parents[2]
DCP_METADATA = "torch.distributed.checkpoint.metadata"  # the module the old unpickler trusted
FAST = ["data.num_workers=0", "logging.tensorboard=false"]  # no worker process to start
PROTO4, STOP, MARK, TUPLE, REDUCE, POP = b"\x80\x04", b".", b"(", b"t", b"R", b"0"


def _str(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw if len(raw) < 256 else b"X" + _u32(len(raw)) + raw


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def _stack_global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + b"\x93"


def _call(function: bytes, *args: bytes) -> bytes:
    return function + MARK + b"".join(args) + TUPLE + REDUCE


def _shell(marker: Path) -> str:
    return f"touch {marker}"


class _Reduce:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (_shell(self.marker),))


def _payload(marker: Path, genuine: bytes) -> dict[str, bytes]:
    """Attack name -> `.metadata` bytes. `genuine` is a real DCP metadata pickle."""
    cmd = _str(_shell(marker))
    python = _str(f"__import__('os').system({_shell(marker)!r})")
    dotted = _call(_stack_global(DCP_METADATA, "os.system"), cmd)
    import_os = _call(_stack_global("builtins", "__import__"), _str("os"))
    get_system = _call(_stack_global("builtins", "getattr"), import_os, _str("system"))
    partial = _call(_stack_global("functools", "partial"), _stack_global("os", "system"), cmd)
    return {
        "naive_reduce": pickle.dumps(_Reduce(marker), protocol=4),
        "naive_reduce_protocol0": pickle.dumps(_Reduce(marker), protocol=0),
        "global_opcode_protocol2": b"\x80\x02cos\nsystem\n" + cmd + b"\x85" + REDUCE + STOP,
        "dotted_stack_global": PROTO4 + dotted + STOP,
        "dotted_global_opcode": PROTO4
        + b"c"
        + DCP_METADATA.encode()
        + b"\nos.system\n"
        + MARK
        + cmd
        + TUPLE
        + REDUCE
        + STOP,
        "dotted_via_torch": PROTO4 + _call(_stack_global("torch", "os.system"), cmd) + STOP,
        "dotted_via_metadata_torch": PROTO4
        + _call(_stack_global(DCP_METADATA, "torch.os.system"), cmd)
        + STOP,
        "stealth_prefix_then_genuine": PROTO4 + dotted + POP + genuine,
        # Without memo entries, which would shift the genuine pickle's memo indices.
        "stealth_naive_then_genuine": pickletools.optimize(pickle.dumps(_Reduce(marker), 4))[:-1]
        + POP
        + genuine,
        "builtins_eval": PROTO4 + _call(_stack_global("builtins", "eval"), python) + STOP,
        "builtins_exec": PROTO4 + _call(_stack_global("builtins", "exec"), python) + STOP,
        "builtins_getattr": PROTO4 + _call(get_system, cmd) + STOP,
        "functools_partial": PROTO4 + partial + b")" + REDUCE + STOP,
    }


ATTACKS = list(_payload(Path("m"), b"").keys())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, demo_cache) -> Path:
    """A two-step tiny run with a checkpoint after each step (step_1, step_2)."""
    run = tmp_path_factory.mktemp("sec") / "run"
    train(load_config(None, [*TINY, f"data.cache_dir={demo_cache}", f"train.run_dir={run}",
                             *FAST, "train.steps=2", "checkpoint.every=1"]))  # fmt: skip
    return run


@pytest.fixture
def attacked(trained_run, tmp_path) -> Callable[[str], tuple[Path, Path]]:
    """`attacked(name)`: (a copy of the run whose newest checkpoint's .metadata is attack
    `name`, the marker file the attack would write)."""

    def make(name: str) -> tuple[Path, Path]:
        run = tmp_path / "run"
        shutil.copytree(trained_run, run)
        metadata = run / "checkpoints" / "step_2" / ".metadata"
        marker = tmp_path / "pwned"
        metadata.write_bytes(_payload(marker, metadata.read_bytes())[name])
        return run, marker

    return make


def _train_args(run: Path, demo_cache: str, *more: str) -> list[str]:
    overrides = [*TINY, *FAST, f"data.cache_dir={demo_cache}", f"train.run_dir={run}", *more]
    return ["train", str(REPO / "launch/demo.yaml"), *overrides]


@pytest.mark.parametrize("name", ATTACKS)
def test_the_attacks_are_real(name, trained_run, tmp_path):
    genuine = (trained_run / "checkpoints" / "step_2" / ".metadata").read_bytes()
    marker = tmp_path / "pwned"
    result = pickle.loads(_payload(marker, genuine)[name])  # unrestricted: runs the payload
    assert marker.exists()
    if name.startswith("stealth"):  # and then loads as the genuine metadata
        assert type(result).__name__ == "Metadata"


@pytest.mark.parametrize("name", ATTACKS)
def test_checkpointer_load_refuses(name, attacked):
    run, marker = attacked(name)
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: .*refusing to load"):
        Checkpointer.load(run / "checkpoints" / "step_2", {"model": {}})
    assert not marker.exists()


@pytest.mark.parametrize("name", ATTACKS)
def test_checkpointer_load_model_refuses(name, attacked):
    run, marker = attacked(name)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        Checkpointer.load_model(run / "checkpoints" / "step_2", {"w": torch.zeros(1)})
    assert not marker.exists()


@pytest.mark.parametrize("name", ATTACKS)
def test_load_checkpoint_model_refuses(name, attacked):
    run, marker = attacked(name)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_checkpoint_model(run / "checkpoints" / "step_2")
    assert not marker.exists()


@pytest.mark.parametrize("name", ATTACKS)
def test_convert_hf_refuses(name, attacked, tmp_path, capsys):
    run, marker = attacked(name)
    with pytest.raises(SystemExit) as exit_info:
        cli(["convert", "hf", str(run / "checkpoints" / "step_2"), str(tmp_path / "hf")])
    assert exit_info.value.code == 1 and not marker.exists()
    err = capsys.readouterr().err
    assert "refusing to load" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "name", ["naive_reduce", "dotted_stack_global", "stealth_prefix_then_genuine"]
)
def test_train_resume_auto_refuses_without_falling_back(name, attacked, demo_cache, capsys):
    """An unsafe newest checkpoint stops the run, though a genuine step_1 is there: falling
    back to it would hide the attack."""
    run, marker = attacked(name)
    with pytest.raises(SystemExit) as exit_info:
        cli(_train_args(run, demo_cache, "train.steps=2", "train.resume=auto"))
    assert exit_info.value.code == 1 and not marker.exists()
    err = capsys.readouterr().err
    assert "step_2/.metadata" in err and "refusing to load" in err and "Traceback" not in err
    assert "trying" not in (run / "train.log").read_text()


@pytest.mark.parametrize("name", ["naive_reduce", "stealth_prefix_then_genuine"])
def test_train_explicit_resume_and_init_from_refuse(name, attacked, demo_cache, tmp_path):
    run, marker = attacked(name)
    step = run / "checkpoints" / "step_2"
    for option in (f"train.resume={step}", f"train.init_from={step}"):
        other = tmp_path / f"other_{option.split('=')[0]}"
        with pytest.raises(SystemExit) as exit_info:
            cli(_train_args(other, demo_cache, "train.steps=2", option))
        assert exit_info.value.code == 1 and not marker.exists()


def test_a_class_attribute_cannot_be_overwritten(tmp_path):
    """BUILD with a slot state on an allowed class would setattr on the class itself."""
    data = (
        PROTO4
        + _stack_global("pathlib", "PosixPath")
        + b"N}"  # state None, slot state {}
        + _str("__str__")
        + _str("pwned")
        + b"s\x86b"  # SETITEM, TUPLE2, BUILD
        + STOP
    )
    path = tmp_path / "step_1"
    path.mkdir()
    (path / ".metadata").write_bytes(data)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        Checkpointer.load_model(path, {})
    assert "__str__" not in vars(pathlib.PosixPath)
    assert "__str__" not in vars(pathlib.PurePosixPath)


def test_an_enum_member_cannot_be_changed(tmp_path):
    """BUILD on the singleton an allowed enum returns would change it for the process."""
    data = (
        PROTO4
        + _call(_stack_global(DCP_METADATA, "_MEM_FORMAT_ENCODING"), b"K\x01")  # BININT1 1
        + b"}"
        + _str("_value_")
        + b"K\x63sb"  # 99, SETITEM, BUILD
        + STOP
    )
    path = tmp_path / "step_1"
    path.mkdir()
    (path / ".metadata").write_bytes(data)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        Checkpointer.load_model(path, {})
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    assert _MEM_FORMAT_ENCODING(1).value == 1


def test_an_unsafe_refusal_is_a_checkpoint_error():
    assert issubclass(UnsafeCheckpointError, CheckpointError)


# -- damaged checkpoints through `mmfm train` (issue 14, defect 10) ---------------------------


def _overwrite(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda step: (step / name).write_bytes(data)


DAMAGE = {
    "garbage_distcp": lambda step: (step / "__0_0.distcp").write_bytes(
        os.urandom((step / "__0_0.distcp").stat().st_size)
    ),
    "missing_distcp": lambda step: (step / "__0_0.distcp").unlink(),
    "garbage_metadata": _overwrite(".metadata", os.urandom(300)),
    "truncated_state": _overwrite("train_state.json", b'{"step": 2, "sched'),
    "list_state": _overwrite("train_state.json", b"[2]"),
    "state_without_keys": _overwrite("train_state.json", b'{"step": 2}'),
}
ONE_LINE = {
    "garbage_distcp": r"step_2/__0_0\.distcp is not readable DCP tensor data",
    "missing_distcp": r"step_2/__0_0\.distcp is missing",
    "garbage_metadata": r"step_2/\.metadata is not readable DCP metadata",
    "truncated_state": r"step_2/train_state\.json is not readable JSON",
    "list_state": r"step_2/train_state\.json holds a list, not an object",
    "state_without_keys": r"step_2/train_state\.json lacks scheduler, loader, nonfinite",
}


@pytest.fixture
def damaged(trained_run, tmp_path) -> Callable[[str], Path]:
    """`damaged(kind)`: a copy of the run whose newest checkpoint (step_2) has damage `kind`."""

    def make(kind: str) -> Path:
        run = tmp_path / "run"
        shutil.copytree(trained_run, run)
        DAMAGE[kind](run / "checkpoints" / "step_2")
        return run

    return make


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_resuming_a_damaged_checkpoint_is_one_line(kind, damaged, demo_cache, capsys):
    run = damaged(kind)
    step = run / "checkpoints" / "step_2"
    with pytest.raises(SystemExit) as exit_info:
        cli(_train_args(run, demo_cache, "train.steps=3", f"train.resume={step}"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("mmfm:")]
    assert re.search(ONE_LINE[kind], line), line


def test_resume_auto_falls_back_past_a_damaged_checkpoint(damaged, demo_cache):
    """Garbage tensor data: the damage DCP itself finds last, after the model is half-filled."""
    kind = "garbage_distcp"
    run = damaged(kind)
    cli(_train_args(run, demo_cache, "train.steps=3", "train.resume=auto"))
    log = (run / "train.log").read_text()
    assert f"cannot resume from {run / 'checkpoints' / 'step_2'}, trying " in log
    assert re.search(ONE_LINE[kind], log)
    assert f"resumed from {run / 'checkpoints' / 'step_1'} at step 1" in log
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]  # rows after step 1 rewritten


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_layers=3", r"model\.layers\.2\.\S+ is not in the checkpoint"),
        ("model.n_layers=1", r"model\.layers\.1\.\S+ is not in this model"),
        ("model.dim=32", r"model\.tok_embeddings\.weight has shape \(\d+, 64\) there, \(\d+, 32\)"),
    ],
)
def test_resuming_with_another_model_shape_is_one_line(
    override, message, trained_run, tmp_path, demo_cache, capsys
):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    with pytest.raises(SystemExit) as exit_info:
        cli(_train_args(run, demo_cache, "train.steps=3", "train.resume=auto", override))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err, err
    assert re.search(message, err) and "make the model section match" in err
    assert "trying" not in (run / "train.log").read_text()  # no fall-back: it is not damage


def test_disk_full_while_saving_is_one_line_and_keeps_the_last_checkpoint(
    trained_run, tmp_path, demo_cache, capsys, monkeypatch
):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    real = dcp_filesystem._write_item

    def write_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dcp_filesystem, "_write_item", write_then_fail)
    with pytest.raises(SystemExit) as exit_info:
        cli(_train_args(run, demo_cache, "train.steps=3", "train.resume=auto"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err, err
    assert "no space left on the device" in err and "step_2 is intact" in err
    monkeypatch.undo()
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_1", "step_2"]
    cli(_train_args(run, demo_cache, "train.steps=3", "train.resume=auto"))
    assert f"resumed from {ckpts / 'step_2'} at step 2" in (run / "train.log").read_text()
    assert Checkpointer(ckpts, 3).latest().name == "step_3"


@pytest.mark.parametrize("kind", ["garbage_distcp", "missing_distcp", "garbage_metadata"])
def test_converting_a_damaged_checkpoint_is_one_line(kind, damaged, tmp_path, capsys):
    run = damaged(kind)
    with pytest.raises(SystemExit) as exit_info:
        cli(["convert", "hf", str(run / "checkpoints" / "step_2"), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("mmfm:")]
    assert re.search(ONE_LINE[kind], line), line
