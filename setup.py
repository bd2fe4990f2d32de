"""Packages of the wheel (the rest of the build is in pyproject.toml). A setup.py because
pyproject.toml cannot both find the flows* packages and add the mapped data packages
(``flows.library.sops`` is the repository's ``sops/``, ``flows.library.templates`` its ``templates/``)."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["flows*"]), "flows.library.sops", "flows.library.templates"])
