"""talkcli: video of one person talking -> drivable 3D avatar -> new talking-head videos."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("talkcli")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+src"
