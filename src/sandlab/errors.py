"""User-facing errors: each carries one line saying what is wrong and how to fix it."""


class SandlabError(Exception):
    """An error caused by the user's input (config, paths, servers), reported as one line."""


class ConfigError(SandlabError):
    """The resolved recipe is invalid."""


class BackendUnavailableError(SandlabError):
    """An inference backend (server, model path) cannot be reached or loaded."""


class EmptyDatasetError(SandlabError):
    """A pipeline stage left nothing to work with."""
