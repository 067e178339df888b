"""`python -m meshlink`: the same as the `meshlink` console script."""

import sys

from meshlink.cli import main

sys.exit(main())
