"""`python -m node.cli`: the same as the `neuronode` command."""

import sys

from node.cli import main

sys.exit(main())
