"""What the controller's backend workers are started with, built from the settings."""

from __future__ import annotations

import os

from mbs_csi import secrets
from mbs_csi.config import Settings
from mbs_csi.controller.records import BackendSpec, WorkerConfig


def worker_config(settings: Settings) -> WorkerConfig:
    """The workers' configuration, secrets revealed for them (and listed for scrubbing)."""
    password = secrets.url_password(settings.database)
    sensitive = [s.reveal() for b in settings.backends for s in b.driver_sensitive_options.values()]
    # Files named by secret-looking options (rbd_keyring_conf, san_private_key): drivers print what they
    # read from them (Cinder's RBD driver logs its connection info, keyring included, at DEBUG).
    for backend in settings.backends:
        for option, value in backend.driver_options.items():
            if secrets.is_secret_name(option) and isinstance(value, str) and os.path.isfile(value):
                sensitive += secrets.file_secrets(value)
    return WorkerConfig(
        database=settings.database,
        state_dir=str(settings.state_dir),
        log_level=settings.log_level,
        backends=tuple(
            BackendSpec(b.name, b.volume_driver, b.all_options(), b.mutable_parameters) for b in settings.backends
        ),
        secrets=tuple(sensitive + ([password] if password else [])),
        backend_timeout=settings.backend_timeout,
    )
