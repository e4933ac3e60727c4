"""``python -m cli ...``: the same as the ``arbiter`` command."""

import sys

from cli.main import main

# Guarded: model processes (arbiter.backends.model_process) start from a fork
# server that imports the parent's main module again, as __mp_main__.
if __name__ == "__main__":
    sys.exit(main())
