"""The operator's web page (``cqrs run --ui-port``, ``cqrs ui``): see ``app`` and ``server``."""
