"""dsbs-jax: Distilling Step-by-Step in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="dsbs-jax",
    version="0.1.0",
    description="Distilling Step-by-Step (Hsieh et al., 2023) in JAX/Flax with SeqIO and gin.",
    python_requires=">=3.10",
    packages=find_packages(include=["dsbs_jax", "dsbs_jax.*", "tasks", "tasks.*"]),
    # The run, model, data and t5x gin files ship inside the package: `--gin_file=runs/demo.gin`
    # finds them from any directory, however the package was installed.
    package_data={"dsbs_jax": ["py.typed", "prompts/*.txt", "gin_configs/**/*.gin"]},
    include_package_data=True,
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "seqio==0.0.20",
        "tensorflow==2.21.0",
        "tensorflow-text==2.21.1",
        "tensorflow-datasets==4.9.10",
        "tensorboard==2.21.0",
        "gin-config==0.5.0",
        "sentencepiece==0.2.3",
        "safetensors==0.8.0",
        "tqdm>=4.66",
        "numpy>=2.0",
        "matplotlib==3.11.2",
    ],
    extras_require={
        # NVIDIA GPUs: JAX's CUDA 12 build at the pinned jax (CUDA and cuDNN from pip wheels).
        "cuda": ["jax[cuda12]==0.10.2"],
        # Compiles for TPU slices on any host (python -m dsbs_jax.aot); the libtpu jax pins.
        "tpu": ["libtpu==0.0.42.1"],
        "test": [
            "libtpu==0.0.42.1",
            # gs:// MODEL_DIR tests: a GCS emulator on loopback, reached by epath through gcsfs.
            "gcp-storage-emulator==2026.7.19",
            "gcsfs==2026.10.1",
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "torch==2.13.0",
            "transformers==5.23.0",
        ],
    },
)
