"""Damaged and lying checkpoints, second round (issue 29).

A tiny one-step run is trained once per module; each test damages a copy of its checkpoint:
the `.metadata` rewritten by the ordinary pickler (wrong types, chunks that do not cover a
tensor), a hand-written pickle that sets attributes on an allowed function or class, a data
file linked in from outside, a `config.yaml` that claims a huge model, a `train_state.json`
that lies. Each is one `CheckpointError` line naming the file and the field, raised before
anything is allocated or trained, and leaves torch as it was.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from test_sec_checkpoint import FAST, POP, PROTO4, STOP, _stack_global, _str, _train_args

from mmfm.cli import main as cli
from mmfm.config import load_config
from mmfm.train.checkpoint import (
    Checkpointer,
    DamagedCheckpointError,
    UnsafeCheckpointError,
    load_checkpoint_model,
)
from mmfm.train.command import train
from mmfm.train.dcp_reader import _unpickle_metadata

from helpers import TINY

STEP = "step_1"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, demo_cache) -> Path:
    """A one-step tiny run with its checkpoint (step_1)."""
    run = tmp_path_factory.mktemp("sec2") / "run"
    train(load_config(None, [*TINY, f"data.cache_dir={demo_cache}", f"train.run_dir={run}",
                             *FAST, "train.steps=1", "checkpoint.every=1"]))  # fmt: skip
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Callable[[], tuple[Path, Path]]:
    """`run_copy()`: (a copy of the run, its checkpoint directory)."""

    def make() -> tuple[Path, Path]:
        run = tmp_path / "run"
        shutil.copytree(trained_run, run)
        return run, run / "checkpoints" / STEP

    return make


NESTED = "nested-10000-deep"
"""A value that `_rewrite_metadata` writes as a list nested 10000 deep (too deep to pickle)."""


def _rewrite_metadata(step: Path, change: Callable) -> None:
    """Unpickle the genuine metadata, `change(metadata)` in place, pickle it back as DCP does."""
    metadata = _unpickle_metadata(step / ".metadata")
    change(metadata)
    depth = 10_000  # EMPTY_LIST n times, APPEND n - 1 times: [[[...]]]
    nested = b"]" * depth + b"a" * (depth - 1)
    data = pickle.dumps(metadata).replace(_str(NESTED), nested)
    (step / ".metadata").write_bytes(pickletools.optimize(data))  # frames sized anew


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("mmfm:")]
    return line


# -- data files outside the checkpoint (defect 1) ----------------------------------------------


@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata"])
def test_a_file_linked_in_from_outside_is_refused(name, run_copy, tmp_path):
    _, step = run_copy()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(step / name, outside / name)
    (step / name).symlink_to(outside / name)
    with pytest.raises(UnsafeCheckpointError, match=rf"{re.escape(name)} .*outside the checkpoint"):
        load_checkpoint_model(step)


def test_a_link_inside_the_checkpoint_loads(run_copy):
    _, step = run_copy()
    (step / "__0_0.distcp").rename(step / "data.bin")
    (step / "__0_0.distcp").symlink_to("data.bin")
    load_checkpoint_model(step)


# -- chunks that do not cover their tensor (defect 2) ------------------------------------------


def _set_chunks(fqn: str, chunks: Callable) -> Callable:
    def change(metadata) -> None:
        entry = metadata.state_dict_metadata[fqn]
        entry.chunks = chunks(entry)

    return change


def _halves(entry) -> list:
    """The whole tensor twice over its first half: the volumes add up, the rows do not."""
    first = type(entry.chunks[0])
    rows, *rest = entry.size
    half = torch.Size([rows // 2, *rest])
    zero = torch.Size([0] * len(entry.size))
    return [first(offsets=zero, sizes=half), first(offsets=zero, sizes=half)]


CHUNK_DAMAGE = {
    "no_chunks": ("model.layers.0.attention.wq.weight", lambda entry: []),
    "overlapping_halves": ("model.layers.0.attention.wq.weight", _halves),
    "optimizer_no_chunks": ("optim.state.layers.0.attention.wq.weight.exp_avg", lambda e: []),
    "chunk_past_the_end": (
        "model.layers.0.attention.wq.weight",
        lambda e: [type(e.chunks[0])(torch.Size([1, 0]), e.size)],
    ),
}


@pytest.mark.parametrize("kind", list(CHUNK_DAMAGE))
def test_chunks_must_cover_every_tensor_exactly(kind, run_copy, tmp_path):
    _, step = run_copy()
    fqn, chunks = CHUNK_DAMAGE[kind]
    _rewrite_metadata(step, _set_chunks(fqn, chunks))
    with pytest.raises(DamagedCheckpointError, match=rf"\.metadata: {re.escape(fqn)} "):
        Checkpointer.load(step, {"model": {}})


def test_no_chunks_does_not_load_uninitialised_memory(run_copy, capsys):
    """Through `mmfm generate`: the weights would be whatever the allocator held."""
    _, step = run_copy()
    _rewrite_metadata(step, _set_chunks("model.layers.0.attention.wq.weight", lambda e: []))
    with pytest.raises(SystemExit) as exit_info:
        cli(["generate", str(step), "--prompt", "a", "--max-new-tokens", "1"])
    assert exit_info.value.code == 1
    assert re.search(r"wq\.weight .*chunks cover 0 of 4096 elements", _one_line(capsys))


# -- wrongly typed metadata (defect 5) ---------------------------------------------------------


def _set_entry(field: str, value) -> Callable:
    def change(metadata) -> None:
        setattr(metadata.state_dict_metadata["model.output.weight"], field, value)

    return change


def _set_chunk(field: str, value) -> Callable:
    def change(metadata) -> None:
        setattr(metadata.state_dict_metadata["model.output.weight"].chunks[0], field, value)

    return change


def _set_storage(field: str, value) -> Callable:
    def change(metadata) -> None:
        setattr(next(iter(metadata.storage_data.values())), field, value)

    return change


def _set_metadata(field: str, value) -> Callable:
    return lambda metadata: setattr(metadata, field, value)


TYPE_DAMAGE = {
    "storage_data_list": (_set_metadata("storage_data", [1, 2]), "storage_data"),
    "storage_data_none": (_set_metadata("storage_data", None), "storage_data"),
    "storage_key_int": (
        _set_metadata("storage_data", {1: 2}),
        "storage_data",
    ),
    "size_int": (_set_entry("size", 5), "model.output.weight"),
    "size_negative": (_set_entry("size", torch.Size([-1, 64])), "model.output.weight"),
    "size_nested": (_set_entry("size", NESTED), "model.output.weight"),
    "chunks_dict": (_set_entry("chunks", {"a": 1}), "model.output.weight"),
    "chunk_sizes_str": (_set_chunk("sizes", "ab"), "model.output.weight"),
    "properties_none": (_set_entry("properties", None), "model.output.weight"),
    "storage_offset_str": (_set_storage("offset", "0"), "storage_data"),
    "storage_length_nested": (_set_storage("length", NESTED), "storage_data"),
    "state_dict_metadata_list": (_set_metadata("state_dict_metadata", [1]), "state_dict_metadata"),
}


@pytest.mark.parametrize("kind", list(TYPE_DAMAGE))
def test_wrongly_typed_metadata_is_one_line(kind, run_copy, capsys):
    _, step = run_copy()
    change, field = TYPE_DAMAGE[kind]
    _rewrite_metadata(step, change)
    with pytest.raises(SystemExit) as exit_info:
        cli(["generate", str(step), "--prompt", "a", "--max-new-tokens", "1"])
    assert exit_info.value.code == 1
    line = _one_line(capsys)
    assert f"{step}/.metadata" in line and field in line, line


# -- BUILD on what is not a fresh instance (defect 3) ------------------------------------------


def _build_on_get_layout(genuine: bytes) -> bytes:
    """BUILD on `torch.serialization._get_layout` (an allowed function): its `cache` becomes
    the pickle's dict, so that every later layout lookup in the process returns float32."""
    return (
        PROTO4
        + _stack_global("torch.serialization", "_get_layout")
        + b"}"  # the state: {"cache": {"torch.strided": torch.float32}}
        + _str("cache")
        + b"}"
        + _str("torch.strided")
        + _stack_global("torch", "float32")
        + b"ssb"  # SETITEM, SETITEM, BUILD
        + POP
        + genuine
    )


def test_build_on_an_allowed_function_is_refused_and_torch_stays_intact(run_copy):
    _, step = run_copy()
    get_layout = torch.serialization._get_layout
    before = dict(vars(get_layout))
    genuine = (step / ".metadata").read_bytes()
    (step / ".metadata").write_bytes(_build_on_get_layout(genuine))
    try:
        with pytest.raises(UnsafeCheckpointError, match=r"_get_layout.*refusing to load"):
            load_checkpoint_model(step)
        assert vars(get_layout).keys() == before.keys()
        assert all(vars(get_layout)[k] is v for k, v in before.items())
        assert get_layout("torch.strided") is torch.strided
    finally:  # the old code leaves torch poisoned: do not let it spoil the other tests
        vars(get_layout).clear()
        vars(get_layout).update(before)


def test_the_get_layout_attack_is_real(run_copy):
    """Unrestricted, the payload poisons torch for the rest of the process."""
    get_layout = torch.serialization._get_layout
    before = dict(vars(get_layout))
    _, step = run_copy()
    try:
        pickle.loads(_build_on_get_layout((step / ".metadata").read_bytes()))
        assert get_layout("torch.strided") is torch.float32
    finally:
        vars(get_layout).clear()
        vars(get_layout).update(before)


def test_slot_state_on_an_allowed_class_is_refused(tmp_path):
    """BUILD's slot state sets attributes that `vars()` of a class does not show."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    data = (
        PROTO4
        + _stack_global("torch.distributed.checkpoint.metadata", "TensorStorageMetadata")
        + b"N}"  # state None, slot state {"__qualname__": "pwned"}
        + _str("__qualname__")
        + _str("pwned")
        + b"s\x86b"  # SETITEM, TUPLE2, BUILD
        + STOP
    )
    path = tmp_path / STEP
    path.mkdir()
    (path / ".metadata").write_bytes(data)
    try:
        with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
            Checkpointer.load_model(path, {})
        assert TensorStorageMetadata.__qualname__ == "TensorStorageMetadata"
    finally:
        TensorStorageMetadata.__qualname__ = "TensorStorageMetadata"


def test_setitem_on_a_class_is_refused(tmp_path):
    data = (
        PROTO4
        + _stack_global("collections", "OrderedDict")
        + _str("pwned")
        + b"Ns"  # SETITEM on the class itself
        + STOP
    )
    path = tmp_path / STEP
    path.mkdir()
    (path / ".metadata").write_bytes(data)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        Checkpointer.load_model(path, {})


# -- a config.yaml that claims a huge model (§4) -----------------------------------------------


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_huge_config_is_refused_before_anything_is_allocated(command, run_copy, capsys):
    _, step = run_copy()
    config = yaml.safe_load((step / "config.yaml").read_text())
    config["model"]["dim"] = 4194304
    (step / "config.yaml").write_text(yaml.safe_dump(config))
    args = {
        "generate": ["generate", str(step), "--prompt", "a", "--max-new-tokens", "1"],
        "eval": ["eval", str(step), "builtin:demo"],
    }[command]
    with pytest.raises(SystemExit) as exit_info:
        cli(args)
    assert exit_info.value.code == 1
    line = _one_line(capsys)
    assert "config.yaml" in line and re.search(r"tok_embeddings\.weight has shape", line), line


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_huge_config_without_weights_is_refused_before_anything_is_allocated(
    command, tmp_path, run_copy, capsys
):
    _, step = run_copy()
    bare = tmp_path / "bare"
    bare.mkdir()
    config = yaml.safe_load((step / "config.yaml").read_text())
    config["model"]["dim"] = 4194304
    (bare / "config.yaml").write_text(yaml.safe_dump(config))
    args = {
        "generate": ["generate", str(bare), "--prompt", "a", "--max-new-tokens", "1"],
        "eval": ["eval", str(bare), "builtin:demo"],
    }[command]
    with pytest.raises(SystemExit) as exit_info:
        cli(args)
    assert exit_info.value.code == 1
    assert "is not a checkpoint directory (no .metadata)" in _one_line(capsys)


# -- a train_state.json that lies or has wrong types (defect 4, §5) ----------------------------


def _set(*path_and_value) -> Callable[[dict], None]:
    """`_set("a", "b", 0, value)`: state["a"]["b"][0] = value."""
    *path, last, value = path_and_value

    def change(state: dict) -> None:
        target = state
        for key in path:
            target = target[key]
        target[last] = value

    return change


def _other_stream(state: dict) -> None:
    state["loader"]["streams"]["99"] = state["loader"]["streams"]["0"]


STREAM = ("loader", "streams", "0")
STATE_LIES = {
    "step_huge": (_set("step", 10**12), r"step is 1000000000000, but the checkpoint is step_1"),
    "step_negative": (_set("step", -5), r"step is -5, not a count"),
    "step_string": (_set("step", "1"), r"step is '1', not a count"),
    "step_float": (_set("step", 1.0), r"step is 1\.0, not a count"),
    "scheduler_list": (_set("scheduler", [1]), r"scheduler is a list, not an object"),
    "scheduler_lr_string": (
        _set("scheduler", "_last_lr", 0, "x"),
        r"scheduler\._last_lr\[0\] is 'x', not a finite number",
    ),
    "scheduler_foreign_key": (_set("scheduler", "optimizer", 1), r"scheduler is a dict, not an"),
    "scheduler_last_epoch": (_set("scheduler", "last_epoch", 7), r"scheduler\.last_epoch is not"),
    "nonfinite_string": (_set("nonfinite", "0"), r"nonfinite is '0', not an object"),
    "nonfinite_negative": (_set("nonfinite", "total", -1), r"nonfinite\.total is -1"),
    "world_size_string": (_set("world_size", "1"), r"world_size is '1', not a count"),
    "loader_list": (_set("loader", []), r"loader lacks one of format"),
    "streams_list": (_set("loader", "streams", []), r"loader lacks one of format"),
    "foreign_stream": (_other_stream, r"loader\.streams has stream '99' of 4"),
    "epoch_string": (
        _set(*STREAM, "readers", 0, 0, "0"),
        r"loader\.streams\.0\.readers\[0\] epoch is '0', not a count",
    ),
    "epoch_huge": (
        _set(*STREAM, "readers", 0, 0, 10**12),
        r"loader\.streams\.0\.readers\[0\] epoch is 1000000000000, more than \d+",
    ),
    "unit_past_the_epoch": (
        _set(*STREAM, "readers", 0, 1, 50),
        r"loader\.streams\.0\.readers\[0\] unit is 50, more than \d+",
    ),
    "cursor_past_the_unit": (
        _set(*STREAM, "readers", 0, 2, 10**6),
        r"loader\.streams\.0\.readers\[0\] document is 1000000, more than \d+",
    ),
    "buffered_document_past_the_unit": (
        _set(*STREAM, "shuffle", 0, 3, 10**6),
        r"loader\.streams\.0\.shuffle document is 1000000, more than \d+",
    ),
    "rng_garbage": (_set(*STREAM, "rng", {"state": 1}), r"loader\.streams\.0\.rng is not"),
    "skipped_string": (_set(*STREAM, "skipped", "x"), r"loader\.streams\.0\.skipped"),
}


def _edit_state(step: Path, change: Callable[[dict], None]) -> None:
    file = step / "train_state.json"
    state = json.loads(file.read_text())
    change(state)
    file.write_text(json.dumps(state))


def test_the_lies_start_from_a_state_that_resumes(run_copy, demo_cache):
    """The genuine state passes every check (the lies below change one field each)."""
    run, step = run_copy()
    state = json.loads((step / "train_state.json").read_text())
    assert state["step"] == 1 and len(state["loader"]["streams"]) == 4
    assert state["loader"]["streams"]["0"]["shuffle"]
    cli(_train_args(run, demo_cache, "train.steps=2", f"train.resume={step}"))
    assert f"resumed from {step} at step 1" in (run / "train.log").read_text()


@pytest.mark.parametrize("kind", list(STATE_LIES))
def test_a_lying_train_state_is_one_line_before_training(kind, run_copy, demo_cache, capsys):
    run, step = run_copy()
    change, message = STATE_LIES[kind]
    _edit_state(step, change)
    with pytest.raises(SystemExit) as exit_info:
        cli(_train_args(run, demo_cache, "train.steps=2", f"train.resume={step}"))
    assert exit_info.value.code == 1
    line = _one_line(capsys)
    assert line.startswith(f"mmfm: checkpoint error: {step}/train_state.json: "), line
    assert re.search(message, line), line
    assert not (run / "checkpoints" / "step_2").exists()


def test_init_data_checks_the_data_state_too(run_copy, demo_cache, tmp_path, capsys):
    _, step = run_copy()
    _edit_state(step, _set(*STREAM, "readers", 0, 2, 10**6))
    options = (f"train.init_from={step}", "train.init_data=true", "train.steps=1")
    with pytest.raises(SystemExit) as exit_info:
        cli(_train_args(tmp_path / "other", demo_cache, *options))
    assert exit_info.value.code == 1
    assert re.search(r"readers\[0\] document is 1000000", _one_line(capsys))


@pytest.mark.parametrize(
    ("content", "message"),
    [(b'{"step": "x"}', r"step is 'x', not a count"), (b"[1]", r"holds a list, not an object")],
)
def test_eval_checks_the_train_state_before_it_evaluates(
    content, message, run_copy, capsys, monkeypatch
):
    _, step = run_copy()
    (step / "train_state.json").write_bytes(content)
    from mmfm.train import eval_command

    def never(*args, **kwargs):
        raise AssertionError("the evaluation ran")

    monkeypatch.setattr(eval_command, "parallelize", never)
    with pytest.raises(SystemExit) as exit_info:
        cli(["eval", str(step), "builtin:demo"])
    assert exit_info.value.code == 1
    assert re.search(message, _one_line(capsys))
