import sys

from guardx.cli import main

sys.exit(main())
