import sys

from unitrain.cli import main

sys.exit(main())
