from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PackageType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PACKAGE_TYPE_UNSPECIFIED: _ClassVar[PackageType]
    PACKAGE_TYPE_ZIP: _ClassVar[PackageType]
    PACKAGE_TYPE_IMAGE: _ClassVar[PackageType]

class Architecture(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARCHITECTURE_UNSPECIFIED: _ClassVar[Architecture]
    ARCHITECTURE_X86_64: _ClassVar[Architecture]
    ARCHITECTURE_ARM64: _ClassVar[Architecture]

class LogKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOG_KIND_UNSPECIFIED: _ClassVar[LogKind]
    LOG_KIND_STREAM: _ClassVar[LogKind]
    LOG_KIND_STATUS: _ClassVar[LogKind]
    LOG_KIND_ERROR: _ClassVar[LogKind]

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_UNSPECIFIED: _ClassVar[Reason]
    REASON_UP_TO_DATE: _ClassVar[Reason]
    REASON_MISSING: _ClassVar[Reason]
    REASON_FORCED: _ClassVar[Reason]
    REASON_BASE_CHANGED: _ClassVar[Reason]
    REASON_LAYER_CHANGED: _ClassVar[Reason]
    REASON_RIE_CHANGED: _ClassVar[Reason]
    REASON_DEFINITION_CHANGED: _ClassVar[Reason]
    REASON_REGISTRY_HIT: _ClassVar[Reason]

class BuildState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUILD_STATE_UNSPECIFIED: _ClassVar[BuildState]
    BUILD_STATE_QUEUED: _ClassVar[BuildState]
    BUILD_STATE_RUNNING: _ClassVar[BuildState]
    BUILD_STATE_SUCCEEDED: _ClassVar[BuildState]
    BUILD_STATE_FAILED: _ClassVar[BuildState]
PACKAGE_TYPE_UNSPECIFIED: PackageType
PACKAGE_TYPE_ZIP: PackageType
PACKAGE_TYPE_IMAGE: PackageType
ARCHITECTURE_UNSPECIFIED: Architecture
ARCHITECTURE_X86_64: Architecture
ARCHITECTURE_ARM64: Architecture
LOG_KIND_UNSPECIFIED: LogKind
LOG_KIND_STREAM: LogKind
LOG_KIND_STATUS: LogKind
LOG_KIND_ERROR: LogKind
REASON_UNSPECIFIED: Reason
REASON_UP_TO_DATE: Reason
REASON_MISSING: Reason
REASON_FORCED: Reason
REASON_BASE_CHANGED: Reason
REASON_LAYER_CHANGED: Reason
REASON_RIE_CHANGED: Reason
REASON_DEFINITION_CHANGED: Reason
REASON_REGISTRY_HIT: Reason
BUILD_STATE_UNSPECIFIED: BuildState
BUILD_STATE_QUEUED: BuildState
BUILD_STATE_RUNNING: BuildState
BUILD_STATE_SUCCEEDED: BuildState
BUILD_STATE_FAILED: BuildState

class Layer(_message.Message):
    __slots__ = ("name", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class InvokeImage(_message.Message):
    __slots__ = ("function_name", "image")
    FUNCTION_NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    function_name: str
    image: str
    def __init__(self, function_name: _Optional[str] = ..., image: _Optional[str] = ...) -> None: ...

class BuildRequest(_message.Message):
    __slots__ = ("package_type", "runtime", "image", "architecture", "layers", "invoke_images", "function_name", "skip_pull_image", "force_image_build")
    PACKAGE_TYPE_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    INVOKE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_NAME_FIELD_NUMBER: _ClassVar[int]
    SKIP_PULL_IMAGE_FIELD_NUMBER: _ClassVar[int]
    FORCE_IMAGE_BUILD_FIELD_NUMBER: _ClassVar[int]
    package_type: PackageType
    runtime: str
    image: str
    architecture: Architecture
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    invoke_images: _containers.RepeatedCompositeFieldContainer[InvokeImage]
    function_name: str
    skip_pull_image: bool
    force_image_build: bool
    def __init__(self, package_type: _Optional[_Union[PackageType, str]] = ..., runtime: _Optional[str] = ..., image: _Optional[str] = ..., architecture: _Optional[_Union[Architecture, str]] = ..., layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., invoke_images: _Optional[_Iterable[_Union[InvokeImage, _Mapping]]] = ..., function_name: _Optional[str] = ..., skip_pull_image: _Optional[bool] = ..., force_image_build: _Optional[bool] = ...) -> None: ...

class BuildPlan(_message.Message):
    __slots__ = ("tag", "base_image", "dockerfile", "architecture", "platform", "layers", "invoke_image_used", "package_type", "runtime", "ignored_layers")
    TAG_FIELD_NUMBER: _ClassVar[int]
    BASE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    DOCKERFILE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    INVOKE_IMAGE_USED_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_TYPE_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    IGNORED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    tag: str
    base_image: str
    dockerfile: str
    architecture: str
    platform: str
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    invoke_image_used: bool
    package_type: str
    runtime: str
    ignored_layers: _containers.RepeatedCompositeFieldContainer[Layer]
    def __init__(self, tag: _Optional[str] = ..., base_image: _Optional[str] = ..., dockerfile: _Optional[str] = ..., architecture: _Optional[str] = ..., platform: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., invoke_image_used: _Optional[bool] = ..., package_type: _Optional[str] = ..., runtime: _Optional[str] = ..., ignored_layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ...) -> None: ...

class BuildEvent(_message.Message):
    __slots__ = ("build_id", "accepted", "queued", "log", "pull_progress", "context_progress", "warning", "completed")
    BUILD_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    PULL_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    build_id: str
    accepted: Accepted
    queued: Queued
    log: Log
    pull_progress: PullProgress
    context_progress: ContextProgress
    warning: Warning
    completed: Completed
    def __init__(self, build_id: _Optional[str] = ..., accepted: _Optional[_Union[Accepted, _Mapping]] = ..., queued: _Optional[_Union[Queued, _Mapping]] = ..., log: _Optional[_Union[Log, _Mapping]] = ..., pull_progress: _Optional[_Union[PullProgress, _Mapping]] = ..., context_progress: _Optional[_Union[ContextProgress, _Mapping]] = ..., warning: _Optional[_Union[Warning, _Mapping]] = ..., completed: _Optional[_Union[Completed, _Mapping]] = ...) -> None: ...

class Accepted(_message.Message):
    __slots__ = ("tag", "joined")
    TAG_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    tag: str
    joined: bool
    def __init__(self, tag: _Optional[str] = ..., joined: _Optional[bool] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class Log(_message.Message):
    __slots__ = ("kind", "text", "step")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    kind: LogKind
    text: str
    step: int
    def __init__(self, kind: _Optional[_Union[LogKind, str]] = ..., text: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class PullProgress(_message.Message):
    __slots__ = ("image", "layer", "current", "total")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    image: str
    layer: str
    current: int
    total: int
    def __init__(self, image: _Optional[str] = ..., layer: _Optional[str] = ..., current: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class ContextProgress(_message.Message):
    __slots__ = ("bytes_sent", "bytes_total")
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    bytes_sent: int
    bytes_total: int
    def __init__(self, bytes_sent: _Optional[int] = ..., bytes_total: _Optional[int] = ...) -> None: ...

class Warning(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ImageConfig(_message.Message):
    __slots__ = ("entrypoint", "cmd", "working_dir", "env", "architecture")
    ENTRYPOINT_FIELD_NUMBER: _ClassVar[int]
    CMD_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    entrypoint: _containers.RepeatedScalarFieldContainer[str]
    cmd: _containers.RepeatedScalarFieldContainer[str]
    working_dir: str
    env: _containers.RepeatedScalarFieldContainer[str]
    architecture: str
    def __init__(self, entrypoint: _Optional[_Iterable[str]] = ..., cmd: _Optional[_Iterable[str]] = ..., working_dir: _Optional[str] = ..., env: _Optional[_Iterable[str]] = ..., architecture: _Optional[str] = ...) -> None: ...

class Completed(_message.Message):
    __slots__ = ("tag", "image_id", "cached", "reason", "changed_layer", "duration_ms", "config", "warnings", "pinned_tag")
    TAG_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHANGED_LAYER_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    PINNED_TAG_FIELD_NUMBER: _ClassVar[int]
    tag: str
    image_id: str
    cached: bool
    reason: Reason
    changed_layer: str
    duration_ms: int
    config: ImageConfig
    warnings: _containers.RepeatedCompositeFieldContainer[Warning]
    pinned_tag: str
    def __init__(self, tag: _Optional[str] = ..., image_id: _Optional[str] = ..., cached: _Optional[bool] = ..., reason: _Optional[_Union[Reason, str]] = ..., changed_layer: _Optional[str] = ..., duration_ms: _Optional[int] = ..., config: _Optional[_Union[ImageConfig, _Mapping]] = ..., warnings: _Optional[_Iterable[_Union[Warning, _Mapping]]] = ..., pinned_tag: _Optional[str] = ...) -> None: ...

class ListBuildsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BuildSummary(_message.Message):
    __slots__ = ("build_id", "tag", "started_unix_ms", "finished_unix_ms", "subscribers", "state", "image_id", "error", "background")
    BUILD_ID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBERS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    build_id: str
    tag: str
    started_unix_ms: int
    finished_unix_ms: int
    subscribers: int
    state: BuildState
    image_id: str
    error: str
    background: bool
    def __init__(self, build_id: _Optional[str] = ..., tag: _Optional[str] = ..., started_unix_ms: _Optional[int] = ..., finished_unix_ms: _Optional[int] = ..., subscribers: _Optional[int] = ..., state: _Optional[_Union[BuildState, str]] = ..., image_id: _Optional[str] = ..., error: _Optional[str] = ..., background: _Optional[bool] = ...) -> None: ...

class ListBuildsResponse(_message.Message):
    __slots__ = ("in_flight", "recent")
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIELD_NUMBER: _ClassVar[int]
    in_flight: _containers.RepeatedCompositeFieldContainer[BuildSummary]
    recent: _containers.RepeatedCompositeFieldContainer[BuildSummary]
    def __init__(self, in_flight: _Optional[_Iterable[_Union[BuildSummary, _Mapping]]] = ..., recent: _Optional[_Iterable[_Union[BuildSummary, _Mapping]]] = ...) -> None: ...

class PruneRequest(_message.Message):
    __slots__ = ("older_than_seconds", "keep_storage_bytes", "dry_run")
    OLDER_THAN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KEEP_STORAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    older_than_seconds: int
    keep_storage_bytes: int
    dry_run: bool
    def __init__(self, older_than_seconds: _Optional[int] = ..., keep_storage_bytes: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class PruneResponse(_message.Message):
    __slots__ = ("images_removed", "layers_removed", "bytes_freed")
    IMAGES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    LAYERS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    images_removed: _containers.RepeatedScalarFieldContainer[str]
    layers_removed: _containers.RepeatedScalarFieldContainer[str]
    bytes_freed: int
    def __init__(self, images_removed: _Optional[_Iterable[str]] = ..., layers_removed: _Optional[_Iterable[str]] = ..., bytes_freed: _Optional[int] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EngineInfo(_message.Message):
    __slots__ = ("host", "reachable", "name", "version", "api_version", "distribution_api", "error", "architectures", "image_store")
    HOST_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_API_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_STORE_FIELD_NUMBER: _ClassVar[int]
    host: str
    reachable: bool
    name: str
    version: str
    api_version: str
    distribution_api: bool
    error: str
    architectures: _containers.RepeatedScalarFieldContainer[str]
    image_store: str
    def __init__(self, host: _Optional[str] = ..., reachable: _Optional[bool] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., api_version: _Optional[str] = ..., distribution_api: _Optional[bool] = ..., error: _Optional[str] = ..., architectures: _Optional[_Iterable[str]] = ..., image_store: _Optional[str] = ...) -> None: ...

class RieInfo(_message.Message):
    __slots__ = ("architecture", "path", "sha256", "present")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    path: str
    sha256: str
    present: bool
    def __init__(self, architecture: _Optional[str] = ..., path: _Optional[str] = ..., sha256: _Optional[str] = ..., present: _Optional[bool] = ...) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("version", "engine", "socket_path", "cache_dir", "cache_bytes", "rie", "capabilities", "limits", "stats", "keep_warm")
    class LimitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    SOCKET_PATH_FIELD_NUMBER: _ClassVar[int]
    CACHE_DIR_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RIE_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    KEEP_WARM_FIELD_NUMBER: _ClassVar[int]
    version: str
    engine: EngineInfo
    socket_path: str
    cache_dir: str
    cache_bytes: int
    rie: _containers.RepeatedCompositeFieldContainer[RieInfo]
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    limits: _containers.ScalarMap[str, str]
    stats: Stats
    keep_warm: KeepWarmInfo
    def __init__(self, version: _Optional[str] = ..., engine: _Optional[_Union[EngineInfo, _Mapping]] = ..., socket_path: _Optional[str] = ..., cache_dir: _Optional[str] = ..., cache_bytes: _Optional[int] = ..., rie: _Optional[_Iterable[_Union[RieInfo, _Mapping]]] = ..., capabilities: _Optional[_Iterable[str]] = ..., limits: _Optional[_Mapping[str, str]] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ..., keep_warm: _Optional[_Union[KeepWarmInfo, _Mapping]] = ...) -> None: ...

class KeepWarmInfo(_message.Message):
    __slots__ = ("window_seconds", "sources", "inotify_watches", "rebuilds")
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    INOTIFY_WATCHES_FIELD_NUMBER: _ClassVar[int]
    REBUILDS_FIELD_NUMBER: _ClassVar[int]
    window_seconds: int
    sources: _containers.RepeatedCompositeFieldContainer[WatchedSource]
    inotify_watches: int
    rebuilds: int
    def __init__(self, window_seconds: _Optional[int] = ..., sources: _Optional[_Iterable[_Union[WatchedSource, _Mapping]]] = ..., inotify_watches: _Optional[int] = ..., rebuilds: _Optional[int] = ...) -> None: ...

class WatchedSource(_message.Message):
    __slots__ = ("path", "mode", "tags")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    path: str
    mode: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, path: _Optional[str] = ..., mode: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("requests", "joined", "cache_hits", "engine_builds", "failures", "files_hashed", "bytes_hashed")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_BUILDS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    FILES_HASHED_FIELD_NUMBER: _ClassVar[int]
    BYTES_HASHED_FIELD_NUMBER: _ClassVar[int]
    requests: int
    joined: int
    cache_hits: int
    engine_builds: int
    failures: int
    files_hashed: int
    bytes_hashed: int
    def __init__(self, requests: _Optional[int] = ..., joined: _Optional[int] = ..., cache_hits: _Optional[int] = ..., engine_builds: _Optional[int] = ..., failures: _Optional[int] = ..., files_hashed: _Optional[int] = ..., bytes_hashed: _Optional[int] = ...) -> None: ...
