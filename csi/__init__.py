"""CSI spec v1.12.0 (package csi.v1): ``csi.proto`` and the Python stubs generated from it.

Regenerate with ``scripts/gen-proto.sh``; never edit ``csi_pb2*.py`` by hand.
"""
