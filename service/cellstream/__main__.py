"""`python -m cellstream` runs the command line."""

from cellstream.tools.cli import main

raise SystemExit(main())
