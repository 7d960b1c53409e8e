"""Cinder-compatible volume drivers that ship with mbs-csi (loaded by cinderlib through ``volume_driver``)."""
