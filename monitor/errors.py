"""Every error this package raises on purpose, under one root.

Each class carries the exit code the command line answers with, so ``asd-monitor`` (and
``asd-export``) catch :class:`AsdError` once and print its one-line message. The codes follow
sysexits(3), and systemd's ``RestartPreventExitStatus`` lists 65 and 78: a bad config or bad
input data does not become a restart loop.

The older built-in bases (``ValueError``, ``RuntimeError``) are kept beside the root so that
code catching them keeps working.
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DATA = 65  # bad input data: audio, bank, model, data set
EXIT_CONFIG = 78  # bad configuration


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line, for one-line errors (libraries' own
    messages can run to pages)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class AsdError(Exception):
    """Root of this package's errors; the message is one line naming what is wrong."""

    exit_code = EXIT_FAILURE


class MissingDependency(AsdError):
    """A package this command needs is not installed; the message names the extra to install."""


class UsageError(AsdError):
    """A command line argparse cannot check by itself (exit 2, like argparse's own errors)."""

    exit_code = EXIT_USAGE


class ConfigError(AsdError, ValueError):
    """The configuration cannot be used; the message names file, key and value."""

    exit_code = EXIT_CONFIG


class DataError(AsdError, ValueError):
    """Input data that cannot be used: audio, a bank, a model, a data set."""

    exit_code = EXIT_DATA


# ------------------------------------------------------------------ audio
class AudioError(DataError):
    """An audio file cannot be used: unreadable, empty, or not finite."""


class ClipTooShort(AudioError):
    """A recording shorter than the shortest a backbone accepts (``monitor.audio.files``)."""


class NothingToEnroll(AudioError):
    """Every window offered for enrollment failed the sensor checks: no normal sound is left."""


class AudioDeviceError(AsdError, RuntimeError):
    """An input device cannot be opened or has failed; the message is one line naming it."""


# ------------------------------------------------------------------ bank
class BankError(DataError):
    """A bank cannot be read, written or used as asked."""


class BankNotFound(BankError):
    """No bank version exists at the path (nothing enrolled yet)."""


class BankCurrentMissing(BankError):
    """Versions exist but no ``CURRENT`` names one: damage, not an empty bank.

    Not a :class:`BankNotFound`: treating it as "nothing enrolled" would start a new bank
    without the enrolled windows, or leave the daemon watching nothing.
    """


# ------------------------------------------------------------------ scoring
class BackboneError(DataError):
    """A backbone cannot be found, loaded or run as asked."""


class ModelMetadataError(BackboneError):
    """An ONNX file's ``asd.*`` metadata is missing or inconsistent."""


class KnnError(DataError):
    """Embeddings that cannot be indexed or scored (shape, finiteness, too few, settings)."""


class RankingError(DataError):
    """Ranks asked for without a reference, or fused with unknown rules, weights or backbones."""


# ------------------------------------------------------------------ offline
class DatasetError(DataError):
    """A data set folder that does not follow a layout we read."""


class ReportError(DataError):
    """Results that cannot be written as asked (official CSVs, plots, tables)."""


# ------------------------------------------------------------------ service and outputs
class CommandError(AsdError, ValueError):
    """A command that cannot be carried out; the reply carries the message, nothing changes."""

    exit_code = EXIT_DATA


class MqttConfigError(DataError):
    """The MQTT settings cannot be used (password source, TLS files); one line naming which."""


class OutboxError(AsdError, RuntimeError):
    """The on-disk outbox cannot be opened or written."""

    exit_code = EXIT_DATA


class OutboxFull(OutboxError):
    """The outbox holds its maximum of undelivered messages."""


class TelemetryError(AsdError, RuntimeError):
    """The metrics endpoint cannot be served."""

    exit_code = EXIT_DATA


# ------------------------------------------------------------------ export
class CheckpointError(DataError):
    """A checkpoint that cannot be read, or whose weights do not fit the architecture."""


class ParityError(AsdError, RuntimeError):
    """An exported graph whose outputs differ from the torch model's beyond tolerance."""
