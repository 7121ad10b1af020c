"""The error hierarchy. Start-up errors map to exit code 2 with one line."""

from __future__ import annotations


class RetrofitError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    exit_code = 2


class ConfigError(RetrofitError):
    """Configuration file, environment or flags are invalid."""


class BundleError(RetrofitError):
    """A model bundle is missing, tampered with, or inconsistent with itself."""


class CaptureError(RetrofitError):
    """The camera or video source cannot be opened."""


class PublishError(RetrofitError):
    """The publish endpoint or metrics address cannot be bound."""
