"""Container images of the components; the tag is the package version (docker/ builds them)."""

from tuneloop import __version__

REPOSITORY = "ghcr.io/tuneloop"
IMAGE = f"{REPOSITORY}/tuneloop:{__version__}"  # CPU stages (docker/Dockerfile)
TRAIN_IMAGE = f"{REPOSITORY}/tuneloop-train:{__version__}"  # CUDA + DeepSpeed (docker/Dockerfile.train)
