import sys

from blkserve.cli import main

sys.exit(main())
