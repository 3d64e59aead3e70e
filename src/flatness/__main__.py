"""``python -m flatness``: the command-line tool (:func:`flatness.cli.main`)."""

from .cli import main

raise SystemExit(main())
