"""The node role: CSI Node service over os-brick; never imports cinder or cinderlib."""
