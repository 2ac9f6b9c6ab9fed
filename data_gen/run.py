"""Data stages of a recipe: python data_gen/run.py --config-name <recipe> [overrides], or one stage on
your own records: python data_gen/run.py stage=<stage> input=<file.jsonl> output=<dir>."""

from sandlab.config import DATA_STAGES
from sandlab.launch.cli import run

if __name__ == "__main__":
    run(stages=DATA_STAGES)
