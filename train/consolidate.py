"""Consolidate a sharded DeepSpeed ZeRO checkpoint into HF safetensors:
python train/consolidate.py <run>/checkpoints/final/checkpoint-<step> <out-dir>"""

from sandlab.train.checkpoints import main

if __name__ == "__main__":
    main()
