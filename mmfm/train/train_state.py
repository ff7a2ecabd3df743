"""`train_state.json` checked before a resume uses any of it.

The file is JSON a person can edit, copy or damage: every field must have the type this run
writes itself, and every number a value the checkpoint and the data allow (the step of its
`step_<N>` directory, a scheduler at that step, data cursors inside the epochs, units and
documents that the data sources hold). A lie or a wrong type is one `DamagedCheckpointError`
naming the file and the field, raised before any tensor is loaded; unchecked, a step of 10^12
would end the run at once as "done", a cursor past its unit would skip data silently.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from mmfm.data.deal import deal
from mmfm.data.loader import STATE_FORMAT
from mmfm.data.raw_stream import POSITIONS
from mmfm.data.sizing import shard_sizes
from mmfm.data.source_reader import EMPTY_EPOCHS_LIMIT
from mmfm.train.dcp_reader import DamagedCheckpointError

STATE_KEYS = ("step", "scheduler", "loader", "nonfinite")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _bad(file: Path, field: str, why: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(
        f"{file}: {field} {why}: the checkpoint is damaged or was edited; use another checkpoint"
    )


def _count(file: Path, field: str, value: Any, most: int | None = None) -> int:
    """`value` a non-negative int (at most `most`)."""
    if type(value) is not int or value < 0:
        raise _bad(file, field, f"is {_shown(value)}, not a count")
    if most is not None and value > most:
        raise _bad(file, field, f"is {value}, more than {most}")
    return value


def _shown(value: Any) -> str:
    """A JSON value in a message: short, and never the whole of a huge one."""
    text = repr(value) if isinstance(value, int | float | str | bool | None) else ""
    return text if 0 < len(text) <= 40 else f"a {type(value).__name__}"


def saved_step(file: Path, state: dict) -> int:
    """The state's step: a count, and the one of its `step_<N>` directory."""
    step = _count(file, "step", state.get("step"))
    named = _STEP_DIR.match(file.parent.name)
    if named and int(named.group(1)) != step:
        raise _bad(file, "step", f"is {step}, but the checkpoint is {file.parent.name}")
    return step


def like(file: Path, field: str, value: Any, reference: Any) -> None:
    """`value` has the structure and types of `reference` (what this run writes): keys of its
    keys (a state saved by an older torch may lack some), the same list lengths and scalar
    types (an int where a float is due; floats finite)."""
    if isinstance(reference, dict):
        if not isinstance(value, dict) or not value.keys() <= reference.keys():
            keys = sorted(reference)
            raise _bad(file, field, f"is {_shown(value)}, not an object of keys {keys}")
        for key, item in value.items():
            like(file, f"{field}.{key}", item, reference[key])
    elif isinstance(reference, list):
        if not isinstance(value, list) or len(value) != len(reference):
            raise _bad(file, field, f"is {_shown(value)}, not a list of {len(reference)}")
        for i, (item, ref) in enumerate(zip(value, reference, strict=True)):
            like(file, f"{field}[{i}]", item, ref)
    elif isinstance(reference, float):
        if type(value) not in (int, float) or not math.isfinite(value):
            raise _bad(file, field, f"is {_shown(value)}, not a finite number")
    elif type(value) is not type(reference):
        raise _bad(file, field, f"is {_shown(value)}, not {type(reference).__name__}")


def check_state(file: Path, state: dict, scheduler: dict, loader: Any) -> None:
    """The whole state of a resume, against this run's own `scheduler` state and `loader`."""
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise DamagedCheckpointError(
            f"{file} lacks {', '.join(missing)}: the checkpoint is damaged or not written by "
            "mmfm train; use another checkpoint"
        )
    step = saved_step(file, state)
    like(file, "scheduler", state["scheduler"], scheduler)
    if "last_epoch" in scheduler and state["scheduler"]["last_epoch"] != step:
        raise _bad(file, "scheduler.last_epoch", f"is not the step {step}")
    like(file, "nonfinite", state["nonfinite"], {"total": 0, "in_a_row": 0})
    total = _count(file, "nonfinite.total", state["nonfinite"].get("total"), step)
    _count(file, "nonfinite.in_a_row", state["nonfinite"].get("in_a_row"), total)
    if "world_size" in state and _count(file, "world_size", state["world_size"]) < 1:
        raise _bad(file, "world_size", "is 0")
    check_loader_state(file, state["loader"], loader)


_SNAPSHOT = {"readers": list, "rng": dict, "shuffle": list, "pack": list, "drawn": list}


def check_loader_state(file: Path, state: Any, loader: Any) -> None:
    """The data streams' state: typed, and every cursor where the data has a document. A
    state of another format, other streams or sources is left to the loader to refuse by
    name; a stream not started yet has no state."""
    if not isinstance(state, dict) or not all(
        isinstance(state.get(k), t)
        for k, t in (("format", str), ("n_streams", int), ("sources", list), ("streams", dict))
    ):
        raise _bad(file, "loader", "lacks one of format, n_streams, sources, streams")
    n_streams = state["n_streams"]
    if (state["format"], n_streams, state["sources"]) != (
        STATE_FORMAT,
        loader.settings.n_streams,
        loader.fingerprint(),
    ):
        return
    sizes = [_samples(spec) for spec in loader.sources]
    for key, snap in state["streams"].items():
        field = f"loader.streams.{key}"
        if not (key.isdigit() and int(key) < n_streams):
            raise _bad(file, "loader.streams", f"has stream {key!r} of {n_streams}")
        if snap is None:  # a stream that has not started
            continue
        if not isinstance(snap, dict) or not all(
            isinstance(snap.get(k), t) for k, t in _SNAPSHOT.items()
        ):
            raise _bad(file, field, f"lacks one of {list(_SNAPSHOT)}")
        _check_snapshot(file, field, snap, int(key), loader, sizes)


def _samples(spec: Any) -> dict[str, int]:
    """{shard url: samples} of a source, -1 where unknown."""
    sizes = shard_sizes(spec.urls, spec.members)
    return {url: size.samples for url, size in zip(spec.urls, sizes, strict=True)}


def _check_snapshot(file, field, snap, stream, loader, sizes) -> None:
    sources, settings = loader.sources, loader.settings

    def units(source: int, epoch: int) -> tuple:
        spec = sources[source]
        shares = deal(spec.urls, settings.n_streams, epoch, settings.seed + source, spec.members)
        return shares[stream]

    def documents(source: int, unit) -> int | None:
        """Positions in the unit: its samples (raw samples: POSITIONS documents each)."""
        held = sizes[source].get(unit.url, -1)
        if held < 0:
            return None
        return len(range(unit.j, held, unit.k)) * (POSITIONS if sources[source].tokenize else 1)

    readers = snap["readers"]
    if len(readers) != len(sources):
        raise _bad(file, f"{field}.readers", f"has {len(readers)} entries, not {len(sources)}")
    epochs = []
    for i, cursor in enumerate(readers):
        where = f"{field}.readers[{i}]"
        if not isinstance(cursor, list) or len(cursor) != 3:
            raise _bad(file, where, f"is {_shown(cursor)}, not [epoch, unit, document]")
        # An epoch gives a document (a token drawn at least) or is one of fewer than
        # EMPTY_EPOCHS_LIMIT empty ones in a row; a capped source stops at its cap.
        drawn = snap["drawn"][i] if i < len(snap["drawn"]) else 0
        cap = EMPTY_EPOCHS_LIMIT * (drawn + 1) if _is_count(drawn) else None
        if sources[i].max_epochs:
            cap = min(cap or sources[i].max_epochs, sources[i].max_epochs)
        epoch = _count(file, f"{where} epoch", cursor[0], cap)
        mine = units(i, epoch)
        unit = _count(file, f"{where} unit", cursor[1], len(mine))
        held = documents(i, mine[unit]) if unit < len(mine) else 0
        _count(file, f"{where} document", cursor[2], held)
        epochs.append(epoch)
    refs = [(f"{field}.shuffle", r, 4) for r in snap["shuffle"]]
    refs += [(f"{field}.pack", r, 5) for r in snap["pack"]]
    for where, ref, length in refs:
        if not isinstance(ref, list) or len(ref) < length or not all(_is_count(x) for x in ref):
            raise _bad(file, where, f"holds {_shown(ref)}, not a document reference")
        source, epoch, unit, kept = ref[:4]
        _count(file, f"{where} source", source, len(sources) - 1)
        _count(file, f"{where} epoch", epoch, epochs[source])
        mine = units(source, epoch)
        _count(file, f"{where} unit", unit, len(mine) - 1)
        held = documents(source, mine[unit])
        _count(file, f"{where} document", kept, None if held is None else held - 1)
    drawn = snap["drawn"]
    if len(drawn) != len(sources) or not all(_is_count(x) for x in drawn):
        raise _bad(file, f"{field}.drawn", f"is not {len(sources)} token counts")
    for key in ("steps", "good"):
        _count(file, f"{field}.{key}", snap.get(key, 0))
    skipped = snap.get("skipped", {})
    if not isinstance(skipped, dict) or not all(_is_count(v) for v in skipped.values()):
        raise _bad(file, f"{field}.skipped", "is not an object of counts")
    try:
        np.random.PCG64().state = snap["rng"]
    except (TypeError, ValueError, KeyError, OverflowError):
        raise _bad(file, f"{field}.rng", "is not a random generator state") from None


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0
