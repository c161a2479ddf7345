"""The builds one server serves, checked together from their manifests before anything loads.

Reads manifests only (no digests, no model): `catrt serve` runs this before binding its port, so a
wrong set of builds is refused in a second; `catrt.load` checks each bundle in full when it loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from catrt.build_config import BuildConfig
from catrt.checks import MAX_KEPT_ALPHAS
from catrt.errors import ConfigError
from catrt.manifest import read_manifest


def check_builds(folders: Sequence[str]) -> list[BuildConfig]:
    """The build configs of `folders`, read from their manifests (no digests: `catrt.load` checks those).

    Refused here, before the port is bound: a folder that is not a bundle, builds of different
    models, two builds of one size, a build of more alphas than the runtime keeps the pruned graphs of per shape (a
    server of nine dropped and remade one at every call in turn).
    """
    builds = [BuildConfig.from_dict(read_manifest(Path(folder)).build) for folder in folders]
    for folder, build in zip(folders, builds, strict=True):
        if len(build.alphas) > MAX_KEPT_ALPHAS:
            raise ConfigError(
                f"--engines {folder} is built for {len(build.alphas)} alphas; a server serves at most {MAX_KEPT_ALPHAS} "
                f"(catrt keeps the pruned graphs of {MAX_KEPT_ALPHAS} alphas per shape, so a call at another would remake "
                f"one at every call): build it with at most {MAX_KEPT_ALPHAS} --alpha values",
                field="engines", value=len(build.alphas),
            )
    models = {build.model for build in builds}
    if len(models) > 1:
        listed = "; ".join(f"{folder} is {build.model}" for folder, build in zip(folders, builds, strict=True))
        raise ConfigError(
            f"--engines must all be builds of one model: {listed}; start one server per model",
            field="engines", value=sorted(models),
        )
    by_size: dict[str, str] = {}
    for folder, build in zip(folders, builds, strict=True):
        size = f"{build.width}x{build.height}"
        if size in by_size:
            raise ConfigError(
                f"--engines {by_size[size]} and {folder} both serve size {size}; serve one build per size",
                field="engines", value=size,
            )
        by_size[size] = folder
    return builds
