"""Container images of the pipeline tasks and training pods; the tag is the package version (docker/ builds
them). Components, the training launchers and the chart check read them from here."""

from tuneloop import __version__

REPOSITORY = "ghcr.io/tuneloop"
IMAGE = f"{REPOSITORY}/tuneloop:{__version__}"  # CPU stages (docker/Dockerfile)
TRAIN_IMAGE = f"{REPOSITORY}/tuneloop-train:{__version__}"  # CUDA + DeepSpeed (docker/Dockerfile.train)
