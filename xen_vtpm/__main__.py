import sys

from xen_vtpm.cli import main

sys.exit(main())
