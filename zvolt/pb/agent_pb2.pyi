from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VolumeCondition(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VOLUME_CONDITION_UNSPECIFIED: _ClassVar[VolumeCondition]
    VOLUME_CONDITION_HEALTHY: _ClassVar[VolumeCondition]
    VOLUME_CONDITION_ABNORMAL: _ClassVar[VolumeCondition]

class Placement(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLACEMENT_UNSPECIFIED: _ClassVar[Placement]
    PLACEMENT_HELD: _ClassVar[Placement]
    PLACEMENT_MOVING: _ClassVar[Placement]
    PLACEMENT_MOVED: _ClassVar[Placement]
    PLACEMENT_INCOMING: _ClassVar[Placement]

class MoveRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MOVE_ROLE_UNSPECIFIED: _ClassVar[MoveRole]
    MOVE_ROLE_SOURCE: _ClassVar[MoveRole]
    MOVE_ROLE_TARGET: _ClassVar[MoveRole]
VOLUME_CONDITION_UNSPECIFIED: VolumeCondition
VOLUME_CONDITION_HEALTHY: VolumeCondition
VOLUME_CONDITION_ABNORMAL: VolumeCondition
PLACEMENT_UNSPECIFIED: Placement
PLACEMENT_HELD: Placement
PLACEMENT_MOVING: Placement
PLACEMENT_MOVED: Placement
PLACEMENT_INCOMING: Placement
MOVE_ROLE_UNSPECIFIED: MoveRole
MOVE_ROLE_SOURCE: MoveRole
MOVE_ROLE_TARGET: MoveRole

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("node_name", "ready", "version", "pool", "parent_dataset", "nvme_transport", "nvme_address", "nvme_port", "volumes", "snapshots", "exports", "startup_seconds", "not_ready_reason")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    PARENT_DATASET_FIELD_NUMBER: _ClassVar[int]
    NVME_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    NVME_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NVME_PORT_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    EXPORTS_FIELD_NUMBER: _ClassVar[int]
    STARTUP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NOT_READY_REASON_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    ready: bool
    version: str
    pool: str
    parent_dataset: str
    nvme_transport: str
    nvme_address: str
    nvme_port: str
    volumes: int
    snapshots: int
    exports: int
    startup_seconds: float
    not_ready_reason: str
    def __init__(self, node_name: _Optional[str] = ..., ready: _Optional[bool] = ..., version: _Optional[str] = ..., pool: _Optional[str] = ..., parent_dataset: _Optional[str] = ..., nvme_transport: _Optional[str] = ..., nvme_address: _Optional[str] = ..., nvme_port: _Optional[str] = ..., volumes: _Optional[int] = ..., snapshots: _Optional[int] = ..., exports: _Optional[int] = ..., startup_seconds: _Optional[float] = ..., not_ready_reason: _Optional[str] = ...) -> None: ...

class Volume(_message.Message):
    __slots__ = ("id", "name", "size_bytes", "volblocksize", "compression", "thick", "encrypted", "source_snapshot_id", "source_volume_id", "published_hosts", "nqn", "created_unix", "used_bytes", "condition", "condition_message", "home_node", "source_home_node")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VOLBLOCKSIZE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    THICK_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_HOSTS_FIELD_NUMBER: _ClassVar[int]
    NQN_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    CONDITION_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HOME_NODE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_HOME_NODE_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    size_bytes: int
    volblocksize: int
    compression: str
    thick: bool
    encrypted: bool
    source_snapshot_id: str
    source_volume_id: str
    published_hosts: _containers.RepeatedScalarFieldContainer[str]
    nqn: str
    created_unix: int
    used_bytes: int
    condition: VolumeCondition
    condition_message: str
    home_node: str
    source_home_node: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., volblocksize: _Optional[int] = ..., compression: _Optional[str] = ..., thick: _Optional[bool] = ..., encrypted: _Optional[bool] = ..., source_snapshot_id: _Optional[str] = ..., source_volume_id: _Optional[str] = ..., published_hosts: _Optional[_Iterable[str]] = ..., nqn: _Optional[str] = ..., created_unix: _Optional[int] = ..., used_bytes: _Optional[int] = ..., condition: _Optional[_Union[VolumeCondition, str]] = ..., condition_message: _Optional[str] = ..., home_node: _Optional[str] = ..., source_home_node: _Optional[str] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("id", "name", "source_volume_id", "size_bytes", "created_unix", "ready_to_use", "used_bytes", "home_node")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    READY_TO_USE_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOME_NODE_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    source_volume_id: str
    size_bytes: int
    created_unix: int
    ready_to_use: bool
    used_bytes: int
    home_node: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., source_volume_id: _Optional[str] = ..., size_bytes: _Optional[int] = ..., created_unix: _Optional[int] = ..., ready_to_use: _Optional[bool] = ..., used_bytes: _Optional[int] = ..., home_node: _Optional[str] = ...) -> None: ...

class CreateVolumeRequest(_message.Message):
    __slots__ = ("name", "size_bytes", "volblocksize", "compression", "thick", "source_snapshot_id", "source_volume_id", "encryption_key", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VOLBLOCKSIZE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    THICK_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_KEY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    volblocksize: int
    compression: str
    thick: bool
    source_snapshot_id: str
    source_volume_id: str
    encryption_key: bytes
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., volblocksize: _Optional[int] = ..., compression: _Optional[str] = ..., thick: _Optional[bool] = ..., source_snapshot_id: _Optional[str] = ..., source_volume_id: _Optional[str] = ..., encryption_key: _Optional[bytes] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CreateVolumeResponse(_message.Message):
    __slots__ = ("volume",)
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    volume: Volume
    def __init__(self, volume: _Optional[_Union[Volume, _Mapping]] = ...) -> None: ...

class DeleteVolumeRequest(_message.Message):
    __slots__ = ("volume_id",)
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    def __init__(self, volume_id: _Optional[str] = ...) -> None: ...

class DeleteVolumeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpandVolumeRequest(_message.Message):
    __slots__ = ("volume_id", "size_bytes", "encryption_key")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_KEY_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    size_bytes: int
    encryption_key: bytes
    def __init__(self, volume_id: _Optional[str] = ..., size_bytes: _Optional[int] = ..., encryption_key: _Optional[bytes] = ...) -> None: ...

class ExpandVolumeResponse(_message.Message):
    __slots__ = ("volume",)
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    volume: Volume
    def __init__(self, volume: _Optional[_Union[Volume, _Mapping]] = ...) -> None: ...

class ModifyVolumeRequest(_message.Message):
    __slots__ = ("volume_id", "compression")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    compression: str
    def __init__(self, volume_id: _Optional[str] = ..., compression: _Optional[str] = ...) -> None: ...

class ModifyVolumeResponse(_message.Message):
    __slots__ = ("volume",)
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    volume: Volume
    def __init__(self, volume: _Optional[_Union[Volume, _Mapping]] = ...) -> None: ...

class GetVolumeRequest(_message.Message):
    __slots__ = ("volume_id",)
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    def __init__(self, volume_id: _Optional[str] = ...) -> None: ...

class GetVolumeResponse(_message.Message):
    __slots__ = ("volume", "placement", "home_node", "moving_to", "moved_to", "move_from", "move_snapshot", "move_final")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    HOME_NODE_FIELD_NUMBER: _ClassVar[int]
    MOVING_TO_FIELD_NUMBER: _ClassVar[int]
    MOVED_TO_FIELD_NUMBER: _ClassVar[int]
    MOVE_FROM_FIELD_NUMBER: _ClassVar[int]
    MOVE_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    MOVE_FINAL_FIELD_NUMBER: _ClassVar[int]
    volume: Volume
    placement: Placement
    home_node: str
    moving_to: str
    moved_to: str
    move_from: str
    move_snapshot: str
    move_final: bool
    def __init__(self, volume: _Optional[_Union[Volume, _Mapping]] = ..., placement: _Optional[_Union[Placement, str]] = ..., home_node: _Optional[str] = ..., moving_to: _Optional[str] = ..., moved_to: _Optional[str] = ..., move_from: _Optional[str] = ..., move_snapshot: _Optional[str] = ..., move_final: _Optional[bool] = ...) -> None: ...

class ListVolumesRequest(_message.Message):
    __slots__ = ("max_entries", "starting_token", "published_only")
    MAX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    STARTING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_ONLY_FIELD_NUMBER: _ClassVar[int]
    max_entries: int
    starting_token: str
    published_only: bool
    def __init__(self, max_entries: _Optional[int] = ..., starting_token: _Optional[str] = ..., published_only: _Optional[bool] = ...) -> None: ...

class ListVolumesResponse(_message.Message):
    __slots__ = ("volumes", "next_token")
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    volumes: _containers.RepeatedCompositeFieldContainer[Volume]
    next_token: str
    def __init__(self, volumes: _Optional[_Iterable[_Union[Volume, _Mapping]]] = ..., next_token: _Optional[str] = ...) -> None: ...

class CreateSnapshotRequest(_message.Message):
    __slots__ = ("name", "source_volume_id", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    source_volume_id: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., source_volume_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CreateSnapshotResponse(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: Snapshot
    def __init__(self, snapshot: _Optional[_Union[Snapshot, _Mapping]] = ...) -> None: ...

class DeleteSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class DeleteSnapshotResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ("max_entries", "starting_token", "source_volume_id", "snapshot_id")
    MAX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    STARTING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    max_entries: int
    starting_token: str
    source_volume_id: str
    snapshot_id: str
    def __init__(self, max_entries: _Optional[int] = ..., starting_token: _Optional[str] = ..., source_volume_id: _Optional[str] = ..., snapshot_id: _Optional[str] = ...) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots", "next_token")
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[Snapshot]
    next_token: str
    def __init__(self, snapshots: _Optional[_Iterable[_Union[Snapshot, _Mapping]]] = ..., next_token: _Optional[str] = ...) -> None: ...

class SnapshotGroup(_message.Message):
    __slots__ = ("id", "name", "snapshots", "created_unix")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    snapshots: _containers.RepeatedCompositeFieldContainer[Snapshot]
    created_unix: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., snapshots: _Optional[_Iterable[_Union[Snapshot, _Mapping]]] = ..., created_unix: _Optional[int] = ...) -> None: ...

class CreateSnapshotGroupRequest(_message.Message):
    __slots__ = ("name", "source_volume_ids", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VOLUME_IDS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    source_volume_ids: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., source_volume_ids: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CreateSnapshotGroupResponse(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: SnapshotGroup
    def __init__(self, group: _Optional[_Union[SnapshotGroup, _Mapping]] = ...) -> None: ...

class GetSnapshotGroupRequest(_message.Message):
    __slots__ = ("group_id",)
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    def __init__(self, group_id: _Optional[str] = ...) -> None: ...

class GetSnapshotGroupResponse(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: SnapshotGroup
    def __init__(self, group: _Optional[_Union[SnapshotGroup, _Mapping]] = ...) -> None: ...

class DeleteSnapshotGroupRequest(_message.Message):
    __slots__ = ("group_id", "snapshot_ids")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_IDS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    snapshot_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, group_id: _Optional[str] = ..., snapshot_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteSnapshotGroupResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetCapacityRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetCapacityResponse(_message.Message):
    __slots__ = ("available_bytes", "total_bytes", "used_bytes", "maximum_volume_size", "committed_bytes", "commitment_limit_ratio", "commitment_available_bytes", "reserve_bytes", "cordoned", "cordon_reason")
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAXIMUM_VOLUME_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_LIMIT_RATIO_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CORDONED_FIELD_NUMBER: _ClassVar[int]
    CORDON_REASON_FIELD_NUMBER: _ClassVar[int]
    available_bytes: int
    total_bytes: int
    used_bytes: int
    maximum_volume_size: int
    committed_bytes: int
    commitment_limit_ratio: float
    commitment_available_bytes: int
    reserve_bytes: int
    cordoned: bool
    cordon_reason: str
    def __init__(self, available_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., maximum_volume_size: _Optional[int] = ..., committed_bytes: _Optional[int] = ..., commitment_limit_ratio: _Optional[float] = ..., commitment_available_bytes: _Optional[int] = ..., reserve_bytes: _Optional[int] = ..., cordoned: _Optional[bool] = ..., cordon_reason: _Optional[str] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("volume_ids", "max_entries", "starting_token")
    VOLUME_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    STARTING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    volume_ids: _containers.RepeatedScalarFieldContainer[str]
    max_entries: int
    starting_token: str
    def __init__(self, volume_ids: _Optional[_Iterable[str]] = ..., max_entries: _Optional[int] = ..., starting_token: _Optional[str] = ...) -> None: ...

class VolumeUsage(_message.Message):
    __slots__ = ("volume_id", "name", "pvc_namespace", "pvc_name", "logical_bytes", "referenced_bytes", "unique_bytes", "written_bytes", "compress_ratio")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PVC_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PVC_NAME_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    REFERENCED_BYTES_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_RATIO_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    name: str
    pvc_namespace: str
    pvc_name: str
    logical_bytes: int
    referenced_bytes: int
    unique_bytes: int
    written_bytes: int
    compress_ratio: float
    def __init__(self, volume_id: _Optional[str] = ..., name: _Optional[str] = ..., pvc_namespace: _Optional[str] = ..., pvc_name: _Optional[str] = ..., logical_bytes: _Optional[int] = ..., referenced_bytes: _Optional[int] = ..., unique_bytes: _Optional[int] = ..., written_bytes: _Optional[int] = ..., compress_ratio: _Optional[float] = ...) -> None: ...

class PoolUsage(_message.Message):
    __slots__ = ("total_bytes", "used_bytes", "available_bytes", "fragmentation_percent")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    used_bytes: int
    available_bytes: int
    fragmentation_percent: int
    def __init__(self, total_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., available_bytes: _Optional[int] = ..., fragmentation_percent: _Optional[int] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("volumes", "next_token", "pool", "not_found_ids")
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_IDS_FIELD_NUMBER: _ClassVar[int]
    volumes: _containers.RepeatedCompositeFieldContainer[VolumeUsage]
    next_token: str
    pool: PoolUsage
    not_found_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, volumes: _Optional[_Iterable[_Union[VolumeUsage, _Mapping]]] = ..., next_token: _Optional[str] = ..., pool: _Optional[_Union[PoolUsage, _Mapping]] = ..., not_found_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class PublishVolumeRequest(_message.Message):
    __slots__ = ("volume_id", "host_nqn", "encryption_key", "dhchap_key", "dhchap_ctrl_key", "tls_psk")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_NQN_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_KEY_FIELD_NUMBER: _ClassVar[int]
    DHCHAP_KEY_FIELD_NUMBER: _ClassVar[int]
    DHCHAP_CTRL_KEY_FIELD_NUMBER: _ClassVar[int]
    TLS_PSK_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    host_nqn: str
    encryption_key: bytes
    dhchap_key: str
    dhchap_ctrl_key: str
    tls_psk: str
    def __init__(self, volume_id: _Optional[str] = ..., host_nqn: _Optional[str] = ..., encryption_key: _Optional[bytes] = ..., dhchap_key: _Optional[str] = ..., dhchap_ctrl_key: _Optional[str] = ..., tls_psk: _Optional[str] = ...) -> None: ...

class PublishVolumeResponse(_message.Message):
    __slots__ = ("nqn", "transport", "address", "port", "host_nqn")
    NQN_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    HOST_NQN_FIELD_NUMBER: _ClassVar[int]
    nqn: str
    transport: str
    address: str
    port: str
    host_nqn: str
    def __init__(self, nqn: _Optional[str] = ..., transport: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[str] = ..., host_nqn: _Optional[str] = ...) -> None: ...

class UnpublishVolumeRequest(_message.Message):
    __slots__ = ("volume_id", "host_nqn")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_NQN_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    host_nqn: str
    def __init__(self, volume_id: _Optional[str] = ..., host_nqn: _Optional[str] = ...) -> None: ...

class UnpublishVolumeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotateKeyRequest(_message.Message):
    __slots__ = ("volume_id", "old_key", "new_key")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    OLD_KEY_FIELD_NUMBER: _ClassVar[int]
    NEW_KEY_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    old_key: bytes
    new_key: bytes
    def __init__(self, volume_id: _Optional[str] = ..., old_key: _Optional[bytes] = ..., new_key: _Optional[bytes] = ...) -> None: ...

class RotateKeyResponse(_message.Message):
    __slots__ = ("encryption_root",)
    ENCRYPTION_ROOT_FIELD_NUMBER: _ClassVar[int]
    encryption_root: str
    def __init__(self, encryption_root: _Optional[str] = ...) -> None: ...

class SendMoveRequest(_message.Message):
    __slots__ = ("volume_id", "target_node", "base_snapshot", "final", "live")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_NODE_FIELD_NUMBER: _ClassVar[int]
    BASE_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    target_node: str
    base_snapshot: str
    final: bool
    live: bool
    def __init__(self, volume_id: _Optional[str] = ..., target_node: _Optional[str] = ..., base_snapshot: _Optional[str] = ..., final: _Optional[bool] = ..., live: _Optional[bool] = ...) -> None: ...

class CheckMovesRequest(_message.Message):
    __slots__ = ("volume_ids",)
    VOLUME_IDS_FIELD_NUMBER: _ClassVar[int]
    volume_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, volume_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class MoveCheck(_message.Message):
    __slots__ = ("volume_id", "moving_to", "blocked", "missing")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    MOVING_TO_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    moving_to: str
    blocked: str
    missing: bool
    def __init__(self, volume_id: _Optional[str] = ..., moving_to: _Optional[str] = ..., blocked: _Optional[str] = ..., missing: _Optional[bool] = ...) -> None: ...

class CheckMovesResponse(_message.Message):
    __slots__ = ("checks",)
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    checks: _containers.RepeatedCompositeFieldContainer[MoveCheck]
    def __init__(self, checks: _Optional[_Iterable[_Union[MoveCheck, _Mapping]]] = ...) -> None: ...

class SendMoveResponse(_message.Message):
    __slots__ = ("token", "address", "snapshot", "base_snapshot", "home_node", "cntlid_min", "cntlid_max")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    BASE_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    HOME_NODE_FIELD_NUMBER: _ClassVar[int]
    CNTLID_MIN_FIELD_NUMBER: _ClassVar[int]
    CNTLID_MAX_FIELD_NUMBER: _ClassVar[int]
    token: str
    address: str
    snapshot: str
    base_snapshot: str
    home_node: str
    cntlid_min: int
    cntlid_max: int
    def __init__(self, token: _Optional[str] = ..., address: _Optional[str] = ..., snapshot: _Optional[str] = ..., base_snapshot: _Optional[str] = ..., home_node: _Optional[str] = ..., cntlid_min: _Optional[int] = ..., cntlid_max: _Optional[int] = ...) -> None: ...

class PrepareMoveRequest(_message.Message):
    __slots__ = ("volume_id", "source_node", "hosts", "source_cntlid_min")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NODE_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_CNTLID_MIN_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    source_node: str
    hosts: _containers.RepeatedCompositeFieldContainer[PublishVolumeRequest]
    source_cntlid_min: int
    def __init__(self, volume_id: _Optional[str] = ..., source_node: _Optional[str] = ..., hosts: _Optional[_Iterable[_Union[PublishVolumeRequest, _Mapping]]] = ..., source_cntlid_min: _Optional[int] = ...) -> None: ...

class PrepareMoveResponse(_message.Message):
    __slots__ = ("paths",)
    PATHS_FIELD_NUMBER: _ClassVar[int]
    paths: _containers.RepeatedCompositeFieldContainer[PublishVolumeResponse]
    def __init__(self, paths: _Optional[_Iterable[_Union[PublishVolumeResponse, _Mapping]]] = ...) -> None: ...

class ReceiveMoveRequest(_message.Message):
    __slots__ = ("volume_id", "home_node", "source_node", "address", "token", "snapshot", "base_snapshot", "max_bytes_per_second")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    HOME_NODE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    BASE_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    home_node: str
    source_node: str
    address: str
    token: str
    snapshot: str
    base_snapshot: str
    max_bytes_per_second: int
    def __init__(self, volume_id: _Optional[str] = ..., home_node: _Optional[str] = ..., source_node: _Optional[str] = ..., address: _Optional[str] = ..., token: _Optional[str] = ..., snapshot: _Optional[str] = ..., base_snapshot: _Optional[str] = ..., max_bytes_per_second: _Optional[int] = ...) -> None: ...

class ReceiveMoveResponse(_message.Message):
    __slots__ = ("bytes", "seconds")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    seconds: float
    def __init__(self, bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class CommitMoveRequest(_message.Message):
    __slots__ = ("volume_id", "source_node")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NODE_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    source_node: str
    def __init__(self, volume_id: _Optional[str] = ..., source_node: _Optional[str] = ...) -> None: ...

class CommitMoveResponse(_message.Message):
    __slots__ = ("volume",)
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    volume: Volume
    def __init__(self, volume: _Optional[_Union[Volume, _Mapping]] = ...) -> None: ...

class FinishMoveRequest(_message.Message):
    __slots__ = ("volume_id", "target_node")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_NODE_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    target_node: str
    def __init__(self, volume_id: _Optional[str] = ..., target_node: _Optional[str] = ...) -> None: ...

class FinishMoveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AbortMoveRequest(_message.Message):
    __slots__ = ("volume_id", "role")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    role: MoveRole
    def __init__(self, volume_id: _Optional[str] = ..., role: _Optional[_Union[MoveRole, str]] = ...) -> None: ...

class AbortMoveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetCordonRequest(_message.Message):
    __slots__ = ("cordoned", "reason")
    CORDONED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    cordoned: bool
    reason: str
    def __init__(self, cordoned: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class SetCordonResponse(_message.Message):
    __slots__ = ("cordoned", "reason")
    CORDONED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    cordoned: bool
    reason: str
    def __init__(self, cordoned: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...
