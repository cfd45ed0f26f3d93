"""Typed errors with actionable messages: each names the input that was wrong and how to fix it.

They subclass the built-in exception a caller would expect (ValueError, FileNotFoundError...), so
`except ValueError` keeps working, and `KosmosGError` catches them all (the CLI prints the message
without a traceback; the ComfyUI nodes let it reach the UI as the node's error text).
"""


class KosmosGError(Exception):
    """Base class of every error the core raises on purpose."""


class CheckpointError(KosmosGError, ValueError):
    """The checkpoint is missing, truncated, corrupt, or not a Kosmos-G checkpoint."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle inside a .pt file asked to run or import something outside the allow-list."""


class TokenizerError(KosmosGError, ValueError):
    """The tokenizer files are missing or do not match the checkpoint."""


class PromptError(KosmosGError, ValueError):
    """The prompt does not fit the images given or the model's limits."""


class ImageError(KosmosGError, ValueError):
    """An image could not be read or has an unusable layout."""


class ConditioningFileError(KosmosGError, ValueError):
    """A saved conditioning file is unreadable, damaged or of an unknown format; or cannot be saved as asked."""


class OutputPathError(KosmosGError, ValueError):
    """An output path cannot be written (a folder where a file goes, a file where a folder goes...)."""


class OutputExistsError(OutputPathError, FileExistsError):
    """An output file is there already and the caller did not ask to replace it."""


class GenerationSettingsError(KosmosGError, ValueError):
    """A sampling setting (steps, size, seed...) is out of range."""


class DeviceError(KosmosGError, ValueError):
    """An unsupported dtype / device was asked for."""


class MissingPackageError(KosmosGError, ImportError):
    """A package one command needs (not the nodes) is not installed: the message says what to install."""


class NonFiniteEncodingError(KosmosGError, FloatingPointError):
    """The encoding (or the images sampled from it) came out inf/NaN: float16 overflowed, or the weights hold inf/NaN."""


def first_line(error: Exception) -> str:
    """What went wrong, from a library's error: their messages run to many lines (logs, hints); the first says it."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
