"""Errors a user can fix. The CLI prints them on one line and exits with their status."""

from __future__ import annotations


class SlmflowError(Exception):
    """Base class: a message that says what is wrong, where, and the fix."""

    exit_code = 2
    retryable = False


class ConfigError(SlmflowError):
    """The config is wrong: a key, a type, a value, a file it names."""


class DataError(SlmflowError):
    """A dataset file is wrong: its format, a line, a column, a label."""


class QualityGateError(SlmflowError):
    """The exported model lost more accuracy than the config allows (outputs are kept)."""

    exit_code = 1
    report_path = None

    @classmethod
    def for_report(cls, path, message: str) -> QualityGateError:
        err = cls(message)
        err.report_path = str(path)
        return err


class StageCheckError(SlmflowError):
    """A stage produced output that failed its own check (merge logits, export load)."""

    exit_code = 1


class ResourceError(SlmflowError):
    """The machine lacks the memory or disk a stage needs (checked before the stage loads anything)."""


class PlacedStageError(SlmflowError):
    """A stage placed on a work pool did not complete there (its flow run failed, crashed, was
    cancelled, or no worker took it)."""

    exit_code = 1
