"""Run the gptoss command line: ``python -m gptoss``."""

import sys

from gptoss.cli import main

sys.exit(main())
