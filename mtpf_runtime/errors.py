"""One small exception hierarchy. Each also subclasses the built-in a caller would expect."""

from __future__ import annotations


class MtpfError(Exception):
    """Base of every error mtpf raises on purpose."""


class BundleError(MtpfError, ValueError):
    """A bundle file is missing, corrupted or inconsistent. The message names the file."""


class ManifestError(BundleError):
    """manifest.json is unreadable or violates the schema."""


class SchemaVersionError(ManifestError):
    """The bundle was written for a schema version this runtime does not read."""


class FingerprintError(BundleError):
    """An adapter was made for another backbone than the one in the bundle."""


class UnknownTaskError(MtpfError, KeyError):
    """The task name is not in the bundle; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class TaskKindError(MtpfError, ValueError):
    """``tag`` on a classification task, or ``classify`` on a NER task."""


class InputError(MtpfError, TypeError):
    """The texts passed in are not a string or a non-empty list of strings."""
