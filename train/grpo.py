"""GRPO of a recipe (rl.* settings): python train/grpo.py --config-name <recipe> [run.dir=<run>], or under `accelerate launch`."""

from sandlab.launch.cli import run

if __name__ == "__main__":
    run(stages=("grpo",))
