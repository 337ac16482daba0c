"""Run prlnbd as ``python -m prlnbd``."""

from prlnbd.cli import main

raise SystemExit(main())
