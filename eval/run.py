"""Evaluation of a recipe's models: python eval/run.py --config-name <recipe> [eval.models=[...]]."""

from sandlab.launch.cli import run

if __name__ == "__main__":
    run(stages=("eval", "report"))
