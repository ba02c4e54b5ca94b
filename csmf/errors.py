"""Domain errors. Each subclasses a built-in so callers may catch either; messages quote the bad
value and what was expected. The service maps them to HTTP codes in one place."""


class CsmfError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(CsmfError, ValueError):
    """A configuration value is invalid."""


class DataError(CsmfError, ValueError):
    """A dataset file is missing, malformed or violates the cascade."""


class FeatureError(CsmfError, ValueError):
    """Raw feature values cannot be encoded."""


class OwnershipError(CsmfError, RuntimeError):
    """Unit ownership is inconsistent, or a frozen parameter changed."""


class BundleError(CsmfError, ValueError):
    """A bundle is missing, corrupt, or does not match what the reader expects."""


class WeightsError(CsmfError, ValueError):
    """An objective weight vector is invalid (NaN, negative, all zero, unknown objective)."""


class ItemWriteError(CsmfError, ValueError):
    """An item write (upsert / delete) or an item-log record is invalid: names the item or
    record and what was expected."""


class IndexUnavailableError(CsmfError, ConnectionError):
    """The vector engine (a Milvus server) cannot answer right now (→ 503): names the engine
    and what failed. The bundle is fine; the request may be retried."""
