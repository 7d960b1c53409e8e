"""CSI Node service: attach with os-brick, format only blank devices, mount, and remember each staged
volume in the local attachment store so every call can be repeated, and undone after a restart."""

from __future__ import annotations

import contextlib
import logging
import os
import time

import grpc

from csi import csi_pb2, csi_pb2_grpc
from mbs_csi import alpha, capabilities, errors
from mbs_csi.capabilities import mode_name, require, sharing_conflict
from mbs_csi.config import Settings
from mbs_csi.inflight import InFlight
from mbs_csi.node import brick, paths, readonly_block
from mbs_csi.node.devices import block_device_size, unused_block_device
from mbs_csi.node.formatting import NotBlankError, format_device
from mbs_csi.node.inspection import attachment_problem, inspect
from mbs_csi.node.mount_error import MountError
from mbs_csi.node.mountinfo import is_mounted, mounted_device
from mbs_csi.node.mounting import mount, unmount
from mbs_csi.node.paths import apply_group, ensure_dir
from mbs_csi.node.resizing import resize_filesystem
from mbs_csi.node.store import ATTACHING, STAGED, Attachment, AttachmentStore, LastStart, Publication
from mbs_csi.node.usage import filesystem_stats
from mbs_csi.publish_context import from_publish_context

RPC = csi_pb2.NodeServiceCapability.RPC
_LOG = logging.getLogger(__name__)


def _mount_options(fs_type: str, flags: list[str]) -> list[str]:
    # A clone or restored snapshot of an xfs volume carries its source's UUID, and xfs refuses to mount
    # a second filesystem with a UUID already mounted on the node.
    return [*flags, "nouuid"] if fs_type == "xfs" and "nouuid" not in flags else flags


def _access(capability: csi_pb2.VolumeCapability) -> capabilities.Access:
    # The controller already refused what the backend cannot do; here only the shape matters.
    return capabilities.access([capability], multiattach=True)


def undo_stage(record: Attachment, store: AttachmentStore) -> None:
    """Undo a stage, whole or stopped halfway: unmount the staging path if the recorded device is what is
    mounted there, release the read-only views, detach, and forget the record."""
    device = os.path.realpath(record.device_path) if record.device_path else ""
    if device and paths.is_mount_point(record.staging_path) and mounted_device(record.staging_path) == device:
        unmount(record.staging_path)
    if device and record.access_type == "block":
        readonly_block.release(device)  # before the device they hold open
    with contextlib.suppress(brick.UnknownProtocol):  # no connector for it: nothing can have been attached
        brick.detach(record.connection_info, record.device_info or None)
    store.remove(record.volume_id)


def reconcile(store: AttachmentStore) -> list[str]:
    """Bring the store and the kernel together at start: undo every stage that stopped halfway (a crash
    between the intent record and its completion) and detach the read-only views no publish uses (made
    by a read-only publish that stopped before its mount); name each fix, each staged volume whose
    device or staging mount is gone (after a reboot: kubelet stages it again), and each publish target
    no longer mounted (kubelet publishes it again or unpublishes it)."""
    fixed = []
    for record in store.all():
        if record.state == ATTACHING:
            try:
                undo_stage(record, store)
            except Exception as exc:  # the node must start anyway: NodeUnstageVolume or a retry finishes it
                fixed.append(f"volume {record.volume_id}: a stage that stopped halfway could not be undone: {exc}")
                continue
            fixed.append(
                f"volume {record.volume_id}: a stage that stopped halfway was undone "
                f"(device {record.device_path or 'not attached yet'}, staging path {record.staging_path})"
            )
            continue
        problem = attachment_problem(record)
        if problem:
            fixed.append(f"volume {record.volume_id}: {problem}")
        publications = store.publications(record.volume_id)
        for publication in publications:
            if not paths.is_mount_point(publication.target_path):
                fixed.append(f"volume {record.volume_id}: target {publication.target_path} is no longer mounted")
        if record.access_type == "block" and record.device_path and not problem:
            fixed.extend(_release_unused_views(record, publications))
    return fixed


def _release_unused_views(record: Attachment, publications: list[Publication]) -> list[str]:
    """Detach the read-only views of a staged block volume that none of its targets is bound to."""
    used = {mounted_device(p.target_path) for p in publications if p.readonly and paths.is_mount_point(p.target_path)}
    fixed = []
    for unused in sorted(set(readonly_block.views(record.device_path)) - used - {None}):
        try:
            readonly_block.detach(unused)
        except Exception as exc:  # NodeUnstageVolume detaches it anyway
            fixed.append(f"volume {record.volume_id}: the unused read-only view {unused} could not be detached: {exc}")
            continue
        fixed.append(f"volume {record.volume_id}: the read-only view {unused}, which no target used, was detached")
    return fixed


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, settings: Settings, store: AttachmentStore) -> None:
        self.settings = settings
        self.store = store
        self.inflight = InFlight()
        started = time.time()
        fixes = reconcile(store)
        for fix in fixes:
            _LOG.warning("at start: %s", fix)
        store.set_last_start(LastStart(started, tuple(fixes)))

    # --- info ---------------------------------------------------------------------------------------

    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        topology = csi_pb2.Topology(segments=dict(self.settings.topology)) if self.settings.topology else None
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.settings.node_id,
            max_volumes_per_node=self.settings.max_volumes_per_node,
            accessible_topology=topology,
        )

    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        rpcs = [
            RPC.STAGE_UNSTAGE_VOLUME,
            RPC.GET_VOLUME_STATS,
            RPC.EXPAND_VOLUME,
            RPC.VOLUME_CONDITION,
            RPC.VOLUME_MOUNT_GROUP,
            RPC.SINGLE_NODE_MULTI_WRITER,
        ]
        rpcs = alpha.advertised(RPC.Type, rpcs, self.settings.alpha_capabilities)
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[csi_pb2.NodeServiceCapability(rpc=RPC(type=t)) for t in rpcs]
        )

    # --- stage --------------------------------------------------------------------------------------

    def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeStageVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        require(request.HasField("volume_capability"), "volume_capability")
        require(dict(request.publish_context), "publish_context (was the volume published to this node?)")
        staging = paths.checked(request.staging_target_path, "staging_target_path")
        wants = _access(request.volume_capability)
        fs_type = wants.fs_type if wants.type == "mount" else ""
        with self.inflight.hold(f"volume:{request.volume_id}"):
            existing = self.store.get(request.volume_id)
            if existing is not None and existing.state == STAGED:
                return self._restage(existing, staging, request, wants.type, fs_type)
            if existing is not None and (existing.staging_path, existing.access_type) != (staging, wants.type):
                undo_stage(existing, self.store)  # a stage that stopped halfway, asked now for something else
            try:
                connection_info = from_publish_context(dict(request.publish_context), dict(request.secrets))
            except KeyError as missing:
                raise errors.FailedPrecondition(
                    f"node-stage secret {missing} is missing: the backend withholds it from publish_context; "
                    "reference a Secret holding it with csi.storage.k8s.io/node-stage-secret-name"
                ) from None
            record = Attachment(
                volume_id=request.volume_id,
                staging_path=staging,
                access_type=wants.type,
                fs_type=fs_type,
                connection_info=connection_info,
                state=ATTACHING,
            )
            self.store.put(record)  # the intent, before attaching: a crash from here on leaves a record
            try:
                self._attach_and_mount(record, list(request.volume_capability.mount.mount_flags))
            except Exception:
                with contextlib.suppress(Exception):
                    undo_stage(record, self.store)
                raise
        return csi_pb2.NodeStageVolumeResponse()

    def _attach_and_mount(self, record: Attachment, flags: list[str]) -> None:
        """Attach, record the device, check it and mount it (formatting a blank one); then mark the record
        staged. A stage that stopped after mounting finds its device mounted at the staging path already."""
        record.device_info = brick.attach(record.connection_info)
        # Only a block device the connector attached, unused, for the volume the connection names.
        device = os.path.realpath(brick.attached_device(record.connection_info, record.device_info))
        record.device_path = device
        self.store.put(record)
        mounted_before = paths.is_mount_point(record.staging_path) and mounted_device(record.staging_path) == device
        if not mounted_before:
            unused_block_device(device)
            if record.access_type == "mount":
                self._format_and_mount(device, record.staging_path, record.fs_type, flags)
        record.state = STAGED
        self.store.put(record)

    @staticmethod
    def _format_and_mount(device: str, staging: str, fs_type: str, flags: list[str]) -> None:
        """Mount the device's filesystem, formatting the device first only when it is blank.

        The mount is tried first: a volume staged before (every pod restart) mounts at once, without a
        probe. A failed mount writes nothing to the device; only then does :func:`format_device` probe it,
        formatting a blank device and refusing one that holds anything (never formatted).
        """
        if paths.is_mount_point(staging):
            raise errors.AlreadyExists(f"{staging} is already mounted with something else")
        paths.prepare_target(staging, "mount")
        options = _mount_options(fs_type, flags)
        try:
            mount(device, staging, fs_type=fs_type, options=options)
            return
        except MountError as mount_error:
            try:
                format_device(device, fs_type)
            except NotBlankError as not_blank:
                if not_blank.filesystem == fs_type:
                    raise mount_error from None  # the right filesystem, but it does not mount: say why
                if not_blank.filesystem is not None:
                    raise errors.FailedPrecondition(
                        f"device {device} already holds a {not_blank.filesystem} filesystem, not {fs_type}; "
                        "refusing to reformat it"
                    ) from mount_error
                raise errors.FailedPrecondition(
                    f"device {device} holds no filesystem but is not blank either (a partition table, another "
                    "signature, or data); refusing to format it"
                ) from mount_error
        mount(device, staging, fs_type=fs_type, options=options)

    def _restage(
        self,
        existing: Attachment,
        staging: str,
        request: csi_pb2.NodeStageVolumeRequest,
        access_type: str,
        fs_type: str,
    ) -> csi_pb2.NodeStageVolumeResponse:
        if existing.staging_path != staging:
            raise errors.FailedPrecondition(f"volume {existing.volume_id} is already staged at {existing.staging_path}")
        if existing.access_type != access_type or existing.fs_type != fs_type:
            raise errors.AlreadyExists(
                f"volume {existing.volume_id} is staged as {existing.access_type} {existing.fs_type}".rstrip()
                + f", not {access_type} {fs_type}".rstrip()
            )
        if access_type == "mount" and not is_mounted(existing.staging_path):  # e.g. after a reboot
            ensure_dir(existing.staging_path)
            mount(
                existing.device_path,
                existing.staging_path,
                fs_type=fs_type,
                options=_mount_options(fs_type, list(request.volume_capability.mount.mount_flags)),
            )
        return csi_pb2.NodeStageVolumeResponse()

    def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        with self.inflight.hold(f"volume:{request.volume_id}"):
            existing = self.store.get(request.volume_id)
            if existing is not None:
                undo_stage(existing, self.store)
        return csi_pb2.NodeUnstageVolumeResponse()

    # --- publish ------------------------------------------------------------------------------------

    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        require(request.target_path, "target_path")
        require(request.HasField("volume_capability"), "volume_capability")
        target = paths.checked(request.target_path, "target_path")
        staging = paths.checked(request.staging_target_path, "staging_target_path")
        wants = _access(request.volume_capability)
        mode = request.volume_capability.access_mode.mode
        # One volume at a time: the access mode limits how its publishes share the node.
        with self.inflight.hold(f"volume:{request.volume_id}"):
            staged = self.store.get(request.volume_id)
            if staged is None or staged.state != STAGED or staged.staging_path != staging:
                raise errors.FailedPrecondition(
                    f"volume {request.volume_id} is not staged at {staging}; stage it first"
                )
            # Read-only when this publish asks, or when the controller published the volume read-only.
            readonly = request.readonly or staged.connection_info.get("data", {}).get("access_mode") == "ro"
            published = self.store.publication(target)
            if published is None:
                self._check_new_target(target, staged, mode, readonly)
            elif published.volume_id != staged.volume_id:
                raise errors.AlreadyExists(f"{target} is where volume {published.volume_id} is published")
            elif (published.access_mode, published.readonly) != (mode, readonly):
                raise errors.AlreadyExists(
                    f"volume {staged.volume_id} is published at {target} as {mode_name(published.access_mode)}"
                    f"{' read-only' if published.readonly else ''}, not {mode_name(mode)}"
                    f"{' read-only' if readonly else ''}"
                )
            elif paths.is_mount_point(target) and self._same_mount(target, staged):
                group = paths.group_id(request.volume_capability.mount.volume_mount_group)
                if group is not None and wants.type == "mount":  # again: a publish may have stopped before it
                    apply_group(target, group)
                return csi_pb2.NodePublishVolumeResponse()
            self._publish(request, staged, Publication(target, staged.volume_id, mode, readonly), wants.type)
        return csi_pb2.NodePublishVolumeResponse()

    def _check_new_target(self, target: str, staged: Attachment, mode: int, readonly: bool) -> None:
        """Refuse a target that is not the driver's to mount on, or one publish too many for the access mode."""
        if paths.is_mount_point(target):
            raise errors.AlreadyExists(f"{target} is already mounted with something else")
        others = self.store.publications(staged.volume_id)
        conflict = sharing_conflict([*((p.access_mode, p.readonly) for p in others), (mode, readonly)])
        if conflict:
            raise errors.FailedPrecondition(
                f"volume {staged.volume_id} is already published at {', '.join(p.target_path for p in others)}; "
                f"{conflict}: unpublish it first"
            )

    def _publish(
        self, request: csi_pb2.NodePublishVolumeRequest, staged: Attachment, publication: Publication, kind: str
    ) -> None:
        """Record the target, make it, bind the staged volume on it and give the group access; a failure at
        any step undoes them all, so that a retry starts again from the beginning."""
        target = publication.target_path
        group = paths.group_id(request.volume_capability.mount.volume_mount_group) if kind == "mount" else None
        created = paths.prepare_target(target, kind)
        self.store.add_publication(publication)
        try:
            if kind == "mount":
                source = staged.staging_path
            else:  # a read-only bind of a device node does not stop writes: see readonly_block
                source = readonly_block.view(staged.device_path) if publication.readonly else staged.device_path
            flags = list(request.volume_capability.mount.mount_flags) if kind == "mount" else []
            mount(source, target, options=flags, bind=True, readonly=publication.readonly)
            if group is not None:
                apply_group(target, group)
        except Exception:
            with contextlib.suppress(Exception):
                if paths.is_mount_point(target):
                    unmount(target)
                if created:
                    paths.remove_target(target)
                self.store.remove_publication(target)
            raise

    @staticmethod
    def _same_mount(target: str, staged: Attachment) -> bool:
        device = mounted_device(target)
        if device == os.path.realpath(staged.device_path):
            return True
        return staged.access_type == "block" and device in readonly_block.views(staged.device_path)

    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        """Unmount and remove a target this driver published the volume at; an unknown target with
        nothing mounted is already unpublished (OK, nothing touched); any other path is refused."""
        require(request.volume_id, "volume_id")
        require(request.target_path, "target_path")
        target = paths.checked(request.target_path, "target_path")
        with self.inflight.hold(f"volume:{request.volume_id}"):
            published = self.store.publication(target)
            if published is not None and published.volume_id != request.volume_id:
                raise errors.FailedPrecondition(
                    f"{target} is where volume {published.volume_id} is published, not {request.volume_id}"
                )
            staged = self.store.get(request.volume_id)
            if published is None and not self._published_before_targets_were_recorded(target, staged):
                if paths.is_mount_point(target):
                    raise errors.FailedPrecondition(
                        f"{target} is a mount point this driver did not publish volume {request.volume_id} at; "
                        "refusing to unmount it"
                    )
                return csi_pb2.NodeUnpublishVolumeResponse()
            if paths.is_mount_point(target):
                unmount(target)
            paths.remove_target(target)
            self.store.remove_publication(target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    def _published_before_targets_were_recorded(self, target: str, staged: Attachment | None) -> bool:
        """Whether ``target`` is a publish of ``staged`` made by a version that kept no publication records:
        a mount of the volume's device other than its staging path."""
        return (
            staged is not None
            and target != staged.staging_path
            and paths.is_mount_point(target)
            and self._same_mount(target, staged)
        )

    # --- stats and expansion ------------------------------------------------------------------------

    def _staged_at(self, volume_id: str, path: str) -> Attachment:
        """The volume's record when ``path`` is its staging path or a target it is published at."""
        path = paths.checked(path, "volume_path")
        staged = self.store.get(volume_id)
        published = self.store.publication(path)
        if (
            staged is None
            or staged.state != STAGED
            or not (
                path == staged.staging_path
                or (published is not None and published.volume_id == volume_id)
                or self._published_before_targets_were_recorded(path, staged)
            )
        ):
            raise errors.NotFound(f"{path} is not a path of volume {volume_id} on this node")
        return staged

    def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        require(request.volume_id, "volume_id")
        require(request.volume_path, "volume_path")
        staged = self._staged_at(request.volume_id, request.volume_path)  # the path first, then its health
        problem, device_size = inspect(staged)
        condition = csi_pb2.VolumeCondition(
            abnormal=problem is not None, message=problem or "volume is attached and mounted as recorded"
        )
        if problem:
            return csi_pb2.NodeGetVolumeStatsResponse(volume_condition=condition)
        Usage = csi_pb2.VolumeUsage
        if staged.access_type == "block":
            usage = [Usage(unit=Usage.BYTES, total=device_size)]
        else:
            stats = filesystem_stats(request.volume_path)
            usage = [
                Usage(
                    unit=Usage.BYTES,
                    total=stats["bytes_total"],
                    used=stats["bytes_used"],
                    available=stats["bytes_available"],
                ),
                Usage(
                    unit=Usage.INODES,
                    total=stats["inodes_total"],
                    used=stats["inodes_used"],
                    available=stats["inodes_free"],
                ),
            ]
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)

    def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeExpandVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.volume_path, "volume_path")
        with self.inflight.hold(f"volume:{request.volume_id}"):
            staged = self._staged_at(request.volume_id, request.volume_path)
            brick.extend(staged.connection_info)  # rescans where the protocol needs it (iSCSI, FC...)
            if staged.access_type == "mount":
                resize_filesystem(staged.device_path, staged.staging_path, staged.fs_type)
            else:
                readonly_block.refresh(staged.device_path)
            size = block_device_size(staged.device_path)
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)
