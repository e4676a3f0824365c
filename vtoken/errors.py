"""User-facing errors. Each says what was expected and what was given."""


class VTokenError(Exception):
    """Base class of vtoken's errors."""


class PruningConfigError(VTokenError, ValueError):
    """A bad argument to ``apply_pruning`` or to a Stage (budget, layer, method, option)."""


class UnsupportedModelError(VTokenError, TypeError):
    """The model is not one of the supported architectures."""


class AlreadyPrunedError(VTokenError, RuntimeError):
    """``apply_pruning`` was called on a model that already carries a pruning handle."""


class HandleRemovedError(VTokenError, RuntimeError):
    """A removed pruning handle was entered again as a context manager: it prunes nothing any more
    (``remove()`` itself may be called again: it does nothing)."""


class DuplicateRegistrationError(PruningConfigError):
    """A method or scorer name is already registered (``register_method`` / ``register_scorer``
    without ``override=True``); the message names the existing registration."""


class DataError(VTokenError, ValueError):
    """An eval data set or output directory cannot be used (missing file, unknown layout)."""


class DataFormatError(DataError):
    """A file read by ``vtoken eval`` (questions, annotations, predictions) is not in the expected
    format; the message names the file and the line, and nothing already written is changed."""


class UnsupportedCallError(VTokenError, ValueError):
    """A call of the pruned model that vtoken cannot serve correctly: a ``generate`` option, cache
    type or input form (a static cache with tokens to drop, ``inputs_embeds`` with pixel inputs, ...).
    Raised before any output is produced; the message says what to use instead."""


class MissingWeightsError(PruningConfigError):
    """A learned method (``gtc``, ``dyvte``) has no trained weights for this model; the message
    names the file it looked for and the command that trains them."""


class DeviceFailed(VTokenError, RuntimeError):
    """The device ran out or failed while ``vtoken eval`` answered a batch (CUDA out of memory, a
    CUDA error: ``vtoken.eval.batches.is_device_failure``), which is not the method's failure: nothing of the batch
    was recorded, and running the same command again resumes there."""

