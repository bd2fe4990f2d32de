"""Edge of the data path: the web app (``sopflow web``), thin over ``flows.service`` and
``flows.service_web``. See ``flows.web.app``."""

from flows.web.app import create_app

__all__ = ["create_app"]
