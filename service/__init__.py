"""alignd-server: the REST API, storage, queue and job bookkeeping (never imports torch)."""

__version__ = "0.1.0"
