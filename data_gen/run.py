"""Data generation stages of a recipe: python data_gen/run.py --config-name <recipe> [overrides]."""

from sandlab.launch.cli import run

if __name__ == "__main__":
    run(stages=("generate", "solve", "filter", "dedup", "export"))
