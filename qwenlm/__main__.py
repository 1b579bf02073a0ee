import sys

from qwenlm.cli import main

sys.exit(main())
