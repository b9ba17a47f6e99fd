"""`python -m keras_twins` is the `keras-twins` command."""

import sys

from keras_twins.cli import main

sys.exit(main())
