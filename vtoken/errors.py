"""User-facing errors. Each says what was expected and what was given."""


class VTokenError(Exception):
    """Base class of vtoken's errors."""


class PruningConfigError(VTokenError, ValueError):
    """A bad argument to ``apply_pruning`` or to a Stage (budget, layer, method, option)."""


class UnsupportedModelError(VTokenError, TypeError):
    """The model is not one of the supported architectures."""


class AlreadyPrunedError(VTokenError, RuntimeError):
    """``apply_pruning`` was called on a model that already carries a pruning handle."""
