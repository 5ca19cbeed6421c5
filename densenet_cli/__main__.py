import sys

from densenet_cli.main import main

sys.exit(main())
