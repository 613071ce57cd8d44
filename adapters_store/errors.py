"""Typed adapter errors; each carries the HTTP status the server maps it to."""

from __future__ import annotations


class AdapterError(Exception):
    """Base class for every adapter storage/validation problem; the message names the problem."""

    status_code = 400


class AdapterValidationError(AdapterError):
    """The adapter files are malformed or do not fit the base model."""

    status_code = 422


class AdapterNotFoundError(AdapterError):
    """No adapter (or no such version) under that name."""

    status_code = 404


class AdapterTooLargeError(AdapterError):
    """The upload (or an archive's uncompressed content) exceeds the size limit."""

    status_code = 413


class InvalidAdapterNameError(AdapterError):
    """The adapter name does not match NAME_RE."""

    status_code = 400


class AdapterIntegrityError(AdapterError):
    """A stored adapter no longer matches its manifest (sha256 or config changed on disk)."""

    status_code = 500


class AdapterStorageFullError(AdapterError):
    """The store's filesystem is full (ENOSPC or quota); nothing of the failed write is left behind."""

    status_code = 507
