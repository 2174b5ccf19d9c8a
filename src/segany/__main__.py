"""``python -m segany`` is the same as the ``segany`` command."""

import sys

from segany.cli.main import main

sys.exit(main())
