"""Names of the files the driver keeps under its state dir (shared by the server and the CLI)."""

ATTACHMENTS_FILE = "attachments.sqlite"  # the node's local attachment store
