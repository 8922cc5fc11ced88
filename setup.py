from setuptools import find_packages, setup

setup(
    name="helm-mrna",
    version="0.1.0",
    description="HELM: hierarchical encoding for mRNA language modeling (training and evaluation)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["helm", "helm.*"]),
    install_requires=[
        "torch>=2.3",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "sentencepiece>=0.2",
        "tokenizers>=0.15",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "scipy>=1.10",
    ],
    # Triton comes with PyTorch's CUDA wheels on Linux, where the kernels run. A CPU-only install
    # needs it only for the interpreter tests (the dev extra).
    extras_require={
        "cuda": ["triton>=3.4", "mamba-ssm>=2.2", "causal-conv1d>=1.4"],
        # Exporting to and importing from Hugging Face transformers.
        "hf": ["transformers>=5.0", "safetensors>=0.4"],
        # transformers and safetensors: the equivalence and export tests (skipped without them).
        "dev": [
            "pytest>=7.4",
            "pytest-timeout>=2.2",
            "hypothesis>=6.80",
            "ruff>=0.5",
            "triton>=3.4",
            "transformers>=5.0",
            "safetensors>=0.4",
            # bench/reproduce_paper.py's PNG figure (axes, labels, error bars).
            "matplotlib>=3.7",
        ],
    },
)
