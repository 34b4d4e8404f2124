import sys

from fastgpt2.cli import main

sys.exit(main())
