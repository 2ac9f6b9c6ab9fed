"""SFT of a recipe: python train/sft.py --config-name <recipe>, or under `accelerate launch`."""

from sandlab.launch.cli import run

if __name__ == "__main__":
    run(stages=("train",))
