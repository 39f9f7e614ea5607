import sys

from relinker.cli import main

sys.exit(main())
