"""``python -m cli ...``: the same as the ``arbiter`` command."""

import sys

from cli.main import main

sys.exit(main())
