"""``python -m iotcls``: the command line (what scorer child processes are started with)."""

import sys

from iotcls.cli import main

sys.exit(main())
