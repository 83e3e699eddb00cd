"""One module per storage backend; each implements the Adapter contract of ``stores.base``."""
