import sys

from densenet_train.cli import main

sys.exit(main())
