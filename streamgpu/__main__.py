import sys

from streamgpu.cli import main

sys.exit(main())
