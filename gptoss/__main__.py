"""Run the gptoss command line: ``python -m gptoss``."""

from gptoss.cli import main

raise SystemExit(main())
