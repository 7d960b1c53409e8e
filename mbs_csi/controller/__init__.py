"""The controller role: CSI Controller service over cinderlib.

cinderlib runs only inside worker processes (``worker.py`` + ``adapter.py``); the gRPC front process
(``service.py``, ``pool.py``) never imports cinder, cinderlib or eventlet.
"""
