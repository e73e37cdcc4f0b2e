"""`python -m cellstream` runs the command line."""

from cellstream.cli import main

raise SystemExit(main())
