"""mbs-csi: a CSI driver serving volumes from any Cinder-supported storage."""

import os
from importlib.metadata import PackageNotFoundError, version

# Children that os-brick forks with a preexec_fn can abort before exec while grpc's fork handlers run
# under load (grpc issue 43055). The driver never uses grpc in a forked child, so turn them off. grpc
# reads this when it is first imported, hence here, before anything imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

try:
    __version__ = version("mbs-csi")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
