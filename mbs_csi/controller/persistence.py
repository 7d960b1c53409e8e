"""cinderlib's database persistence, keeping secrets out of the connection rows it writes.

A driver's connection info may carry a secret: Cinder's RBD driver returns the whole keyring file,
iSCSI drivers a CHAP password. cinderlib stores connection info as it is, in a plain column of the
``volume_attachment`` table. The controller needs none of it again: ``publish_context`` withholds those
entries anyway and the node takes them from its node-stage secrets, and unpublishing needs only the
connector. So each withheld entry is stored as ``publish_context.WITHHELD``, and a publish answered from
the database names the same withheld keys as the first one did.

cinderlib takes a persistence class as its ``storage`` setting; this is one.
"""

from __future__ import annotations

from typing import Any

from cinderlib.persistence.dbms import DBPersistence

from mbs_csi.publish_context import withhold_secrets


class SecretFreePersistence(DBPersistence):
    def set_connection(self, connection: Any) -> None:
        stored = connection._ovo.connection_info
        if "connection_info" in connection._changed_fields and stored and stored.get("conn"):
            connection._ovo.connection_info = {**stored, "conn": withhold_secrets(stored["conn"])}
        super().set_connection(connection)
