"""Data stages of a recipe: python data_gen/run.py --config-name <recipe> [overrides], or one stage on
your own records: python data_gen/run.py stage=<stage> input=<file.jsonl> output=<dir>."""

from sandlab.launch.cli import run
from sandlab.stages import data_stage_names

if __name__ == "__main__":
    run(stages=data_stage_names())
