"""Typed errors of the engines package.

Every message is one line that says what went wrong and what to do about it; the CLI prints
`str(error)` as is, without a traceback.
"""

from __future__ import annotations


class EngineError(Exception):
    """Root of every error raised by `engines`.

    `retriable` tells a caller whether trying the same call again later can succeed
    (e.g. a registry being written by another process), as opposed to a permanent fault.
    """

    retriable: bool = False


class EngineNotFound(EngineError):
    """No engine (active or named) exists in the registry."""


class EngineLoadError(EngineError):
    """An engine exists but cannot be loaded (bad manifest, missing runtime, broken file)."""


class IntegrityError(EngineLoadError):
    """An artifact's sha256 does not match its manifest: the file was changed after the build."""


class ActivationRefused(EngineError):
    """Activation of a rejected build was asked without `force`."""


class NothingToRollBack(EngineError):
    """Rollback was asked but no earlier active version is recorded."""


class ModelNotFound(EngineError):
    """The encoder package or a trained model folder is missing or incomplete."""


class DataError(EngineError):
    """A dataset cannot be located or parsed."""


class BuildError(EngineError):
    """Export, quantization or an engine build failed."""


class BackendUnavailable(EngineError):
    """The runtime a backend needs (tensorrt, CUDA, ...) is not installed on this machine."""
