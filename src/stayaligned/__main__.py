"""`python -m stayaligned ...` is the `stayaligned` command (used by study device workers)."""

import sys

from stayaligned.cli import main

sys.exit(main())
