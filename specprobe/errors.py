"""Typed errors of specprobe.

Every error a user can cause (a bad model name, a missing file, a prompt too long, a bad option)
is a `SpecProbeError`: the API raises it, the CLI prints its message on one line and exits with
status 2. Anything else is a bug.
"""


class SpecProbeError(Exception):
    """Base class of the errors a user can cause."""


class ModelNotFoundError(SpecProbeError):
    """The model name is neither a built-in alias, a local directory or file, nor a loadable hub id."""


class PromptTooLongError(SpecProbeError):
    """The prompt leaves no room for a new token within the model's context length."""


class InvalidOptionError(SpecProbeError, ValueError):
    """An option has a bad value (unknown method, negative budget, ...)."""


class BenchError(SpecProbeError):
    """A benchmark input or output problem: unreadable questions, a malformed answer file, an
    output folder that already holds answers."""
