"""``python -m llmarch.train ...`` (what ``torchrun --nproc_per_node N -m llmarch.train ...`` runs per rank)."""
import os
import sys

from llmarch.cli.train import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A rank has left the process group cleanly (checkpoints are written atomically before that). Exit without
    # running interpreter teardown: on CPU, the destructors of torch's distributed threads can abort a rank at
    # exit ("terminate called without an active exception") after all the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
sys.exit(code)
