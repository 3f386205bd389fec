"""`python -m star.cli`, the same as the `star` script."""

from star.cli import main

raise SystemExit(main())
