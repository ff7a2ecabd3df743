"""One error base for everything a user can cause or fix, and one subclass per area.

The CLI catches `MmfmError` once: it prints `mmfm: <area> error: <message>` on one line and
exits with the class's `exit_code` (2 for configuration and command-line mistakes, 3 for the
machine or launch environment, 1 for every other area). Anything else that escapes is a bug
in mmfm and keeps its traceback. Each area's errors also derive from the builtin they
replaced (`ValueError`, `RuntimeError`, `FileNotFoundError`), so older `except` clauses hold.
"""

from __future__ import annotations


class MmfmError(Exception):
    """An error whose message tells the user what to change."""

    exit_code = 1
    area = "mmfm"


class ConfigError(MmfmError, ValueError):
    """A configuration, recipe or command-line option is invalid; the message says what to
    change."""

    exit_code = 2
    area = "config"


class LaunchError(MmfmError, RuntimeError):
    """The machine or launch environment cannot run what was asked: no `MASTER_ADDR`, no CUDA
    device, no `sbatch`, a world size that does not fit."""

    exit_code = 3
    area = "environment"


class DataError(MmfmError, RuntimeError):
    """Data that cannot be read or cannot go on: a damaged shard, too many bad samples, every
    source at its cap, a data state that does not match the run."""

    area = "data"


class InputNotFound(DataError, FileNotFoundError):
    """A file, folder or glob a user named does not exist or matches nothing."""


class CheckpointError(MmfmError, RuntimeError):
    """A checkpoint is missing, incomplete, unsafe or does not match the run."""

    area = "checkpoint"


class ConversionError(MmfmError, RuntimeError):
    """A checkpoint or folder that cannot be converted; the message says why."""

    area = "conversion"


class TokenizerError(MmfmError, ValueError):
    """A tokenizer, vocabulary or input the tokenizers refuse (a bad id, an unsafe SVG, a DNA
    record with foreign letters, a file that is no picture)."""

    area = "tokenizer"


class TrainingError(MmfmError, RuntimeError):
    """Training cannot go on: too many non-finite losses in a row."""

    area = "training"
