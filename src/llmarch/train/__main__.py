"""``python -m llmarch.train ...`` (what ``torchrun --nproc_per_node N -m llmarch.train ...`` runs per rank)."""
import sys

from llmarch.cli.train import main

sys.exit(main())
