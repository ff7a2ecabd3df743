"""Install mmfm: `pip install -e .`, or `pip install -e ".[test]"` for the test suite."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _version() -> str:
    for line in (ROOT / "mmfm" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("mmfm/__init__.py has no __version__")


setup(
    name="mmfm",
    version=_version(),
    description="Train multimodal foundation models with Megatron-style parallelism on PyTorch",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mmfm", "mmfm.*"]),
    install_requires=[
        # The range mmfm/core/torch_compat.py (every private torch API mmfm uses) is tested on;
        # tests/unit/test_torch_compat.py fails outside it, so an upgrade is a deliberate change.
        "torch>=2.13,<2.14",
        "numpy",
        "omegaconf>=2.3",
        "webdataset>=0.2.86",
        "sentencepiece",
        "safetensors",
        "tensorboard",
        "tqdm",
        "defusedxml",
        "biopython",
        "Pillow",
    ],
    extras_require={
        "svg": ["cairosvg"],
        "hf": ["transformers>=4.45", "protobuf"],
        "video": ["av>=12"],
        "coco": ["pycocotools"],
        # Megatron-LM indexed datasets in and out (mmfm/data/megatron.py); 0.16 is the last
        # megatron-core for Python 3.11, later ones need 3.12
        "megatron": ["megatron-core>=0.16"],
        # experiment trackers (logging.wandb, logging.mlflow); mlflow-skinny is the client
        # without the server, enough for logging to a server or a local file store
        "wandb": ["wandb>=0.31"],
        "mlflow": ["mlflow-skinny>=3.17"],
        # The test tools in the ranges the suite runs on (.ci/run installs them afresh, as a
        # user does: pytest 9.0.3 and 9.2.0, pytest-xdist 3.8.0, hypothesis 6.155 and 6.170
        # passed); the next major release is a deliberate upgrade.
        "test": [
            "pytest>=9.0,<10",
            "pytest-xdist>=3.8,<4",  # `make test` runs the suite on two workers (--dist loadgroup)
            "pytest-timeout>=2.3,<3",  # pyproject.toml's timeout: a hung test fails, not the run
            "hypothesis>=6.155,<7",  # the fuzz tests of tests/security
            "transformers>=4.45",
            "protobuf",
            "ruff==0.17.6",
            "cairosvg",
            "av>=12",
            "pycocotools",
            "megatron-core>=0.16",
            # megatron-core's torch_dist writer needs it, undeclared (without it a save hangs)
            "psutil",
            "wandb>=0.31",
            "mlflow-skinny>=3.17",
            # the documentation site (mkdocs.yml); tests/unit/test_docs.py builds it --strict
            "mkdocs>=1.6,<2",
            "mkdocs-material>=9.5,<10",
        ],
    },
    entry_points={"console_scripts": ["mmfm = mmfm.cli:main"]},
)
