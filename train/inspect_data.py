"""Inspect training data as the trainer sees it: python train/inspect_data.py --config-name <recipe>
[--samples N] [data.dataset_path=<jsonl> | run.dir=<run>] (loss mask, token counts, truncated share)."""

from sandlab.launch.cli import inspect_main

if __name__ == "__main__":
    inspect_main()
