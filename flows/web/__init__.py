"""Edge of the data path: the web app (``sopflow web``), thin over the service floor
(``flows.services``). See ``flows.web.app``."""

from flows.web.app import create_app

__all__ = ["create_app"]
