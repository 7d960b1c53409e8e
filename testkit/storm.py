"""Concurrent volume lifecycles against a controller under test, made as the sidecars make them, every
answer checked against the request it answers; and the drain that deletes whatever is left.

One lifecycle: CreateVolume, data written into the volume (so that copies of it take a while), publish
to a node, CreateSnapshot, a clone (CreateVolume from the volume); then, unless the client's seeded dice
say to keep all that (published) for the drain, unpublish, DeleteSnapshot, and DeleteVolume of the clone
and of the volume.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

from csi import csi_pb2 as pb
from testkit import audit, loop
from testkit.audit import Audit
from testkit.controller import ControllerUnderTest
from testkit.csi_requests import GIB, create_request, mount_cap
from testkit.sidecar import Attempts, Gate, Shut, Sidecar, Unanswered, channel_to

MIB = 1024**2
DATA_BYTES = 64 * MIB  # written into each volume: a copy of it is a cp and an fsync of that much
DATA_BLOCK = b"\x5a" * MIB  # not zeros: a sparse copy skips zeros
NODE = "node-a"
OTHER_NODE = "node-b"
STUCK_AFTER = 240.0  # seconds a client may take to finish its lifecycle once asked to stop


class Crossed(Exception):
    """An answer that does not answer the request: the lifecycle cannot go on with it."""


class Storm:
    """``clients`` threads running lifecycles until :meth:`stop` (at most ``max_lifecycles`` each, a bound
    for a test that forgets to stop it)."""

    def __init__(
        self,
        ctl: ControllerUnderTest,
        findings: Audit,
        *,
        clients: int,
        seed: int,
        call_timeout: float,
        give_up: float,
        keep: float = 0.25,
        max_lifecycles: int = 100,
    ) -> None:
        self.ctl = ctl
        self.audit = findings
        self.attempts = Attempts()
        self.gate = Gate()
        self.channel = channel_to(ctl.driver.target)
        self.seed = seed
        self.call_timeout = call_timeout
        self.give_up = give_up
        self.keep = keep
        self.max_lifecycles = max_lifecycles
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._created: dict[str, pb.CreateVolumeRequest] = {}  # volume id -> the request that made it
        self._done = 0
        self._threads = [
            threading.Thread(target=self._client, args=(index,), name=f"storm-{index}", daemon=True)
            for index in range(clients)
        ]

    @property
    def database(self) -> Path:
        return self.ctl.state / "mbs-csi.sqlite"

    def sidecar(self, seed: int) -> Sidecar:
        return Sidecar(self.channel, self.attempts, self.gate, self.call_timeout, self.give_up, seed)

    # --- running ------------------------------------------------------------------------------------

    def start(self) -> Storm:
        for thread in self._threads:
            thread.start()
        return self

    @property
    def lifecycles_done(self) -> int:
        with self._lock:
            return self._done

    def stop(self) -> None:
        """Let every client finish the lifecycle it is in, and wait for them."""
        self._stop.set()
        self._join(STUCK_AFTER)

    def _join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                self.audit.add(audit.LOCKED, f"client {thread.name} still busy {timeout:.0f}s after the storm")

    def close(self) -> None:
        """Stop every client at its next call (a test that ended early), and close the channel."""
        self._stop.set()
        self.gate.shut()
        self._join(self.call_timeout + 10)
        self.channel.close()

    def _client(self, index: int) -> None:
        client = self.sidecar(self.seed * 1000 + index)
        dice = random.Random(self.seed * 1000 + index)
        for number in range(self.max_lifecycles):
            if self._stop.is_set():
                return
            try:
                self._lifecycle(client, f"{index}-{number}", keep=dice.random() < self.keep)
            except Unanswered as exc:
                self.audit.add(audit.LOCKED if exc.gave_up else audit.FINAL_ERROR, str(exc))
            except Crossed as exc:
                self.audit.add(audit.CROSSED, str(exc))
            except Shut:
                return
            with self._lock:
                self._done += 1

    def _lifecycle(self, client: Sidecar, tag: str, keep: bool) -> None:
        volume_id = self._create(client, create_request(f"pvc-{tag}"))
        self._fill(volume_id)
        self._publish(client, volume_id, NODE)
        snapshot_id = self._snapshot(client, f"snap-{tag}", volume_id)
        clone_id = self._create(client, create_request(f"clone-{tag}", volume=volume_id))
        if keep:
            return
        self._unpublish(client, volume_id, NODE)
        client.call("DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot_id=snapshot_id), snapshot_id)
        for made in (clone_id, volume_id):
            client.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=made), made)

    # --- calls, each answer checked -----------------------------------------------------------------

    def _create(self, client: Sidecar, request: pb.CreateVolumeRequest) -> str:
        """CreateVolume; its answer must be a volume of that name, of that source, the same every time."""
        answer = client.call("CreateVolume", request, request.name).volume
        volume_id = answer.volume_id
        source = request.volume_content_source.volume.volume_id
        row = audit.named(self.database, "volumes", volume_id)
        if row is None or row[0] != request.name:
            raise Crossed(f"CreateVolume({request.name}) answered volume {volume_id}, whose row is {row}")
        if answer.content_source.volume.volume_id != source or answer.capacity_bytes != GIB:
            raise Crossed(f"CreateVolume({request.name}) answered {answer} for a source {source or 'none'}, 1 GiB")
        with self._lock:
            self._created[volume_id] = request
        return volume_id

    def _fill(self, volume_id: str) -> None:
        """Write data into the volume, as a pod would through its device."""
        path = self.ctl.volume_file(volume_id)
        try:
            with open(path, "r+b") as volume:
                for _ in range(DATA_BYTES // MIB):
                    volume.write(DATA_BLOCK)
        except FileNotFoundError:
            raise Crossed(f"volume {volume_id} was answered, and its file {path.name} does not exist") from None

    def _publish(self, client: Sidecar, volume_id: str, node: str) -> None:
        """ControllerPublishVolume; its device must be a loop device of that volume's file."""
        request = pb.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=node, volume_capability=mount_cap())
        device = client.call("ControllerPublishVolume", request, volume_id).publish_context.get("device_path", "")
        bound = loop.devices_backed_by(self.ctl.volume_file(volume_id))
        if device not in bound:
            raise Crossed(f"publishing {volume_id} answered device {device!r}; the volume's file is on {bound}")

    def _unpublish(self, client: Sidecar, volume_id: str, node: str) -> None:
        request = pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node)
        client.call("ControllerUnpublishVolume", request, volume_id)

    def _snapshot(self, client: Sidecar, name: str, volume_id: str) -> str:
        """CreateSnapshot; its answer must be a snapshot of that name, of that volume."""
        request = pb.CreateSnapshotRequest(name=name, source_volume_id=volume_id)
        answer = client.call("CreateSnapshot", request, name).snapshot
        row = audit.named(self.database, "snapshots", answer.snapshot_id)
        if answer.source_volume_id != volume_id or row != (name, volume_id):
            raise Crossed(
                f"CreateSnapshot({name} of {volume_id}) answered snapshot {answer.snapshot_id} of "
                f"{answer.source_volume_id}, whose row is {row}"
            )
        return answer.snapshot_id

    # --- the drain ----------------------------------------------------------------------------------

    def drain(self) -> None:
        """Delete everything the controller lists, as an operator cleaning up would, after checking that
        each volume is neither locked nor answered twice: a repeated CreateVolume answers the same volume,
        and the volume can be published and unpublished again."""
        for name, count in audit.duplicate_names(self.database):
            self.audit.add(audit.CROSSED, f"{count} live rows are named {name}")
        client = self.sidecar(self.seed * 1000 + 999)
        snapshots = self._settle(client, "ListSnapshots", pb.ListSnapshotsRequest(), "all")
        for entry in snapshots.entries if snapshots else []:
            snapshot_id = entry.snapshot.snapshot_id
            self._settle(client, "DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot_id=snapshot_id), snapshot_id)
        volumes = self._settle(client, "ListVolumes", pb.ListVolumesRequest(), "all")
        for entry in volumes.entries if volumes else []:
            volume_id = entry.volume.volume_id
            try:
                self._check_volume(client, volume_id, list(entry.status.published_node_ids))
            except Unanswered as exc:
                self.audit.add(audit.LOCKED if exc.gave_up else audit.FINAL_ERROR, str(exc))
            except Crossed as exc:
                self.audit.add(audit.CROSSED, str(exc))
            self._settle(client, "DeleteVolume", pb.DeleteVolumeRequest(volume_id=volume_id), volume_id)

    def _check_volume(self, client: Sidecar, volume_id: str, published: list[str]) -> None:
        with self._lock:
            request = self._created.get(volume_id)
        if request is not None:
            again = client.call("CreateVolume", request, request.name).volume.volume_id
            if again != volume_id:
                raise Crossed(f"CreateVolume({request.name}) answered {volume_id}, and {again} when repeated")
        for node in published:
            self._unpublish(client, volume_id, node)
        self._publish(client, volume_id, OTHER_NODE)
        self._unpublish(client, volume_id, OTHER_NODE)

    def _settle(self, client: Sidecar, method: str, request: Any, about: str) -> Any:
        """The answer of ``method``; a request that never answers OK is a finding (None), and the drain
        goes on."""
        try:
            return client.call(method, request, about)
        except Unanswered as exc:
            self.audit.add(audit.LOCKED if exc.gave_up else audit.FINAL_ERROR, str(exc))
            return None
