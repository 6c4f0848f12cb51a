import sys

from llmarch.cli import main

sys.exit(main())
