"""The controller role: CSI Controller service over cinderlib.

cinderlib runs only inside worker processes (``worker.py``, which loads ``adapter.py`` and the modules it
uses); the gRPC front process (``service.py``, ``pool.py``) never imports cinder, cinderlib or eventlet.
"""
