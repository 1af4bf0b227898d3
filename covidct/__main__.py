"""python -m covidct ... (the same as the covidct command)."""
import sys

from .cli import main

sys.exit(main())
