from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="minicnn-covidct",
    version="0.1.0",
    description="minicnn: a from-scratch NumPy/CuPy CNN engine; covidct: a COVID-19 lung-CT classifier built on it",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["minicnn", "minicnn.*", "covidct", "covidct.*"]),
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.23",
        "scipy>=1.9",
        "pillow>=9.0",
        "pandas>=1.5",
        "tqdm>=4.60",
        "matplotlib>=3.5",
    ],
    entry_points={"console_scripts": ["covidct = covidct.cli:main"]},
    extras_require={
        # threadpoolctl lets minicnn hold BLAS at one thread: its thread pool then uses the cores, and
        # training gives the same weights on any machine (README, "Determinism and threads").
        "fast": ["threadpoolctl>=3"],
        "test": ["pytest>=7", "threadpoolctl>=3", "safetensors>=0.4"],
        "gpu": ["cupy-cuda12x"],
        # DICOM / NIfTI scans (covidct predict scan.nii.gz), ONNX export, the local web page.
        # safetensors export needs nothing: it is written with NumPy (the package only tests it).
        "dicom": ["pydicom>=2.4", "nibabel>=5.0"],
        "onnx": ["onnx>=1.14", "onnxruntime>=1.16"],
        "web": ["flask>=2.3"],
        "mpi": ["mpi4py", "mpich"],     # data-parallel training; the mpich wheel brings mpiexec
    },
)
