"""``python -m flows`` is the ``sopflow`` command."""

from flows.cli import main

main()
