"""``python -m llama_actors`` is the ``llama-actors`` command."""

import sys

from llama_actors._cli.main import main

sys.exit(main())
