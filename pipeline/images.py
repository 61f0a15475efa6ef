"""The one place container image references come from.

Every image is ``<registry>/<step>:<tag>``, registry and tag from the settings
(``FRAUD_IMAGE_REGISTRY``, ``FRAUD_IMAGE_TAG``; defaults in ``fraud_common.settings``).
``build_images.sh`` builds the same names (it reads ``STEPS`` and ``REGISTRY``/``TAG`` here), the
pipeline's components use them as base images, and the SparkApplication / InferenceService
launched by the pipeline default to them. To use your own registry, set the two variables when
building and compiling, or pass ``spark_image`` / ``predictor_image`` as pipeline parameters.
"""

from __future__ import annotations

import sys

from fraud_common.settings import Settings

_SETTINGS = Settings.from_env()
# Registry and namespace of the project's images.
REGISTRY = _SETTINGS.image_registry
# One tag for the whole set: images built together are used together.
TAG = _SETTINGS.image_tag

# Step name (as used in image names) -> folder holding its Containerfile.
STEPS: dict[str, str] = {
    "data-preparation": "data_preparation",
    "feature-engineering": "feature_engineering",
    "train": "train",
    "rest-predictor": "rest_predictor",
    "pipeline": "pipeline",
    "monitoring": "monitoring",  # the scheduled drift report (pipeline/monitoring_pipeline.py)
}


def image(step: str, tag: str = TAG, registry: str = REGISTRY) -> str:
    """The image reference of ``step`` (one of ``STEPS``), e.g. ``quay.io/…/train:0.1.0``."""
    if step not in STEPS:
        raise ValueError(f"unknown image step {step!r}; known steps: {', '.join(sorted(STEPS))}")
    if not tag or any(ch in tag for ch in "/: "):
        raise ValueError(f"image tag {tag!r} is not a valid tag")
    return f"{registry.rstrip('/')}/{step}:{tag}"


def main(argv: list[str] | None = None) -> int:
    """Print ``<step> <folder>`` lines, or the defaults, for build_images.sh."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["defaults"]:
        print(f"{REGISTRY} {TAG}")
    else:
        for step, folder in STEPS.items():
            print(f"{step} {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
