"""`python -m captionflow run ...`"""

import sys

from captionflow.cli import main

sys.exit(main())
