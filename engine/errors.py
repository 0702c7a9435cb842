"""Exceptions the engine raises; the HTTP layer maps each class to a status code."""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The request itself is wrong (bad parameter, unknown adapter, ...): HTTP 400/404/413."""


class UnknownAdapterError(InvalidRequestError):
    """The request names an adapter that is not loaded."""


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the context window even after dropping old turns."""


class EngineOverloadedError(EngineError):
    """Too many requests are waiting; try again later (HTTP 503)."""


class EngineDeadError(EngineError):
    """The engine loop has stopped; the engine must be replaced."""


class AdapterNotFoundError(UnknownAdapterError):
    """No store holds an adapter of that name (HTTP 404 naming it)."""


class AdapterTimeoutError(EngineError):
    """Fetching or reading the adapter took longer than `adapter_load_timeout_s` (HTTP 504)."""
