"""Errors a user can act on. The CLI prints them as one line (``guardx: error: ...``) and exits 2."""


class GuardxError(Exception):
    """Base class: the message names the problem and, where possible, the fix."""


class ConfigError(GuardxError):
    pass


class DataError(GuardxError):
    pass


class NonFiniteLossError(GuardxError):
    pass


class MissingDependencyError(GuardxError):
    def __init__(self, package: str, extra: str, what: str = ""):
        what = f" for {what}" if what else ""
        super().__init__(f"{package} is not installed{what}: pip install 'guardx[{extra}]'")
