import sys

from emu_mc.evaluate.cli import main

sys.exit(main())
