"""``python -m nmflow``: the ``nmflow`` command, also where the console script is not on PATH."""

from nmflow.app.cli import main

raise SystemExit(main())
