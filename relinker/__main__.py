import sys

from relinker.entry import main

sys.exit(main())
