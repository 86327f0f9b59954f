"""Errors a user can act on. The CLI prints them as one line (``guardx: error: ...``) and exits 2."""
import difflib


class GuardxError(Exception):
    """Base class: the message names the problem and, where possible, the fix."""


class ConfigError(GuardxError, ValueError):
    pass


class DataError(GuardxError):
    pass


class NonFiniteLossError(GuardxError):
    pass


class Terminated(GuardxError):
    """The process got SIGTERM (torchrun stops the other ranks this way when one fails; SLURM on cancel)."""


class GuardxWarning(UserWarning):
    """Something guardx handled for the user and reports in one line (e.g. a corrupt checkpoint set aside)."""


def warn(message: str) -> None:
    """A one-line ``guardx: warning: ...`` (the CLI formats :class:`GuardxWarning` without file and line)."""
    import warnings

    warnings.warn(message, GuardxWarning, stacklevel=2)


class MissingDependencyError(GuardxError):
    def __init__(self, package: str, extra: str, what: str = ""):
        what = f" for {what}" if what else ""
        super().__init__(f"{package} is not installed{what}: pip install 'guardx[{extra}]'")


def did_you_mean(word: str, choices, prefix: str = "") -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""``: the hint every unknown-name error ends with."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""
