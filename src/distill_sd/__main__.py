import sys

from distill_sd.cli import main

sys.exit(main())
