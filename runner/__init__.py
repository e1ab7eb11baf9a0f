"""flame-magic's runner: the Flame application process that evaluates ``%%flmrun`` cells.

Flame's executor manager starts it (``python -m flame_magic_runner`` or ``flame-magic-runner``) once
per session binding. :mod:`flame_magic_runner.service` serves Flame's ``Instance`` gRPC service and
hands each cell to the main thread; :mod:`flame_magic_runner.evaluate` runs the cell in a namespace
that persists for the life of the process.
"""
