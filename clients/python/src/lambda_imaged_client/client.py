"""A small synchronous client for the lambda-imaged daemon (gRPC over its Unix socket).

`connect(socket)` checks that something accepts connections on the socket and returns a
`Client`; `Client.build(...)` yields the daemon's `BuildEvent`s, ending with `completed`;
`Client.resolve(...)` returns the `BuildPlan` (tag, base, Dockerfile) without engine I/O.
Failures raise `DaemonError` (the gRPC status code's name and the daemon's message), or its
subclass `DaemonUnavailable` when the daemon cannot be reached at all or the connection to it
broke mid-call.
"""

import grp
import os
import pwd
import socket as _socket
import stat
from typing import Iterable, Iterator, Mapping, Optional, Tuple, Union

import grpc

from .v1 import image_builder_pb2 as pb
from .v1 import image_builder_pb2_grpc as pb_grpc

SYSTEM_SOCKET = "/run/lambda-imaged/lambda-imaged.sock"

# How long connect() and the unary calls wait for the daemon to answer. Builds have no
# client-side deadline: the daemon bounds them itself (--build-timeout).
DEFAULT_TIMEOUT_S = 5.0

_PACKAGE_TYPES = {"zip": pb.PACKAGE_TYPE_ZIP, "image": pb.PACKAGE_TYPE_IMAGE}
_ARCHITECTURES = {"x86_64": pb.ARCHITECTURE_X86_64, "arm64": pb.ARCHITECTURE_ARM64}


class DaemonError(Exception):
    """The daemon answered with an error status (or could not be reached: see subclass)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        #: The gRPC status code's name, e.g. "NOT_FOUND", "INVALID_ARGUMENT".
        self.code = code
        #: The daemon's message (what failed and what to do).
        self.message = message


class DaemonUnavailable(DaemonError):
    """Nothing answers on the socket (it is missing, refused, or the daemon does not respond),
    or the connection broke mid-call. An UNAVAILABLE the daemon itself sends (its engine is
    unreachable, it is shutting down) is a plain `DaemonError` with code "UNAVAILABLE"."""

    def __init__(self, socket: str, reason: str, *, broke: bool = False):
        if broke:
            message = f"the connection to lambda-imaged at {socket} broke mid-call ({reason})"
            message += ": the daemon was stopped or killed; retry once it is back (a build it had "
            message += "begun is built again, nothing half-done is kept)"
        else:
            message = f"lambda-imaged is not reachable at {socket}: {reason}"
        super().__init__("UNAVAILABLE", message)
        self.socket = socket
        #: grpcio's or the OS's own words for what failed.
        self.reason = reason
        #: True when the daemon had answered and the connection then broke.
        self.broke = broke


def default_socket() -> str:
    """The socket the daemon listens on by default, as the daemon itself picks it:
    `$LAMBDA_IMAGED_SOCKET`, else `/run/lambda-imaged/lambda-imaged.sock` as root, else
    `$XDG_RUNTIME_DIR/lambda-imaged.sock` (falling back to the system socket)."""
    explicit = os.environ.get("LAMBDA_IMAGED_SOCKET")
    if explicit:
        return explicit
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if os.geteuid() != 0 and runtime_dir:
        return os.path.join(runtime_dir, "lambda-imaged.sock")
    return SYSTEM_SOCKET


LayerSpec = Union[Tuple[str, str], "pb.Layer"]


def build_request(
    *,
    runtime: str = "",
    package_type: Union[str, int] = "zip",
    image: str = "",
    architecture: Union[str, int] = "x86_64",
    layers: Iterable[LayerSpec] = (),
    invoke_images: Union[Mapping[Optional[str], str], Iterable[Tuple[Optional[str], str]], None] = None,
    function_name: str = "",
    skip_pull_image: bool = False,
    force_image_build: bool = False,
) -> "pb.BuildRequest":
    """A `BuildRequest` from plain Python values.

    `package_type` is "zip" or "image" (any case, so SAM's "Zip"/"Image" work) or the enum;
    `architecture` is "x86_64" or "arm64" or the enum; `layers` are `(name, path)` pairs in the
    function's order (paths made absolute here); `invoke_images` maps a function name (None or
    "" for the global default) to an image reference.
    """
    req = pb.BuildRequest(
        package_type=_enum(package_type, _PACKAGE_TYPES, "package_type"),
        runtime=runtime or "",
        image=image or "",
        architecture=_enum(architecture, _ARCHITECTURES, "architecture"),
        function_name=function_name or "",
        skip_pull_image=bool(skip_pull_image),
        force_image_build=bool(force_image_build),
    )
    for layer in layers:
        if isinstance(layer, pb.Layer):
            req.layers.append(layer)
        else:
            name, path = layer
            req.layers.add(name=name, path=os.path.abspath(os.fspath(path)))
    if invoke_images:
        pairs = invoke_images.items() if isinstance(invoke_images, Mapping) else invoke_images
        for fn, ref in pairs:
            req.invoke_images.add(function_name=fn or "", image=ref)
    return req


def _enum(value, names, field):
    if isinstance(value, int):
        return value
    try:
        return names[str(value).lower()]
    except KeyError:
        raise ValueError(f"{field} must be one of {sorted(names)}, not {value!r}") from None


def _check_socket(path: str, timeout: float) -> None:
    """Fails fast (DaemonUnavailable) when nothing accepts connections on `path`; a stale
    socket file would otherwise make gRPC retry until its deadline."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError:
        raise DaemonUnavailable(path, "no such socket (is the daemon running?)") from None
    except ConnectionRefusedError:
        raise DaemonUnavailable(path, "connection refused (the daemon is not running)") from None
    except PermissionError:
        raise DaemonUnavailable(path, "permission denied: " + _explain_denied(path)) from None
    except OSError as err:
        raise DaemonUnavailable(path, err.strerror or str(err)) from None
    finally:
        sock.close()


def _name(lookup, number: int) -> str:
    try:
        return lookup(number)[0]
    except KeyError:
        return str(number)


def _explain_denied(path: str) -> str:
    """Why connect(2) on `path` failed with EACCES and what to do: the socket's owner, group and
    mode and whether the caller is in that group (connect needs write permission on the socket
    and search permission on the directories above it). Mirrors the Rust client's message."""
    uid = os.getuid()
    user = _name(pwd.getpwuid, uid)
    me = f"user {user} (uid {uid})" if user != str(uid) else f"uid {uid}"
    try:
        st = os.stat(path)
    except OSError as err:
        return (
            f"{me} cannot look the socket up ({err.strerror}): a directory on the path "
            f"({os.path.dirname(path)}) is not searchable by {me}; ask the administrator to open "
            "it to the daemon's group"
        )
    owner = _name(pwd.getpwuid, st.st_uid)
    group = _name(grp.getgrgid, st.st_gid)
    what = f"the socket is owned by {owner}:{group} with mode {stat.S_IMODE(st.st_mode):04o}"
    if st.st_gid == 0 or not st.st_mode & stat.S_IWGRP:
        return (
            f"{what}, so only {owner} may connect; run as {owner}, or have the daemon started "
            "with --socket-group GROUP (SocketGroup= for systemd) and join that group"
        )
    in_session = st.st_gid in os.getgroups() or st.st_gid == os.getegid()
    try:
        listed = user in grp.getgrgid(st.st_gid).gr_mem
    except KeyError:
        listed = False
    if listed and not in_session:
        return (
            f"{what}; {me} is a member of {group} but this login session is not yet: log in "
            f"again (or run `newgrp {group}`)"
        )
    if in_session:
        return (
            f"{what}; {me} is in {group}, yet the socket refused it: check the mode of the "
            "socket and of the directories above it"
        )
    return (
        f"{what} and {me} is not in group {group}; join it (sudo usermod -aG {group} {user}, "
        f"then log in again) or run as a member of {group}"
    )


# The trailer on every status the daemon itself sends (src/error.rs, ORIGIN_METADATA): an
# UNAVAILABLE without it was made up by grpcio's transport, so the daemon is not reachable.
_ORIGIN_KEY, _ORIGIN_DAEMON = "lambda-imaged-origin", "daemon"


def _from_daemon(err: grpc.RpcError) -> bool:
    try:
        trailers = err.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - an error without a call has no trailers
        return False
    return any(key == _ORIGIN_KEY and value == _ORIGIN_DAEMON for key, value in trailers)


def _daemon_error(err: grpc.RpcError, socket: str, *, mid_call: bool = False) -> DaemonError:
    """The exception for `err`: `DaemonUnavailable` when grpcio's transport failed (nothing
    listens, or the connection broke: `mid_call` once the daemon had answered), else a
    `DaemonError` with the daemon's code and message (its UNAVAILABLE names the engine)."""
    code = err.code() if hasattr(err, "code") else None
    name = code.name if code is not None else "UNKNOWN"
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    if not _from_daemon(err):
        if code is grpc.StatusCode.UNAVAILABLE:
            return DaemonUnavailable(socket, details, broke=mid_call)
        # grpcio may report a stream cut mid-call as UNKNOWN or INTERNAL ("Stream removed").
        if mid_call and code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
            return DaemonUnavailable(socket, details, broke=True)
    return DaemonError(name, details)


class Client:
    """A connection to one daemon. Thread-safe; close() it (or use `with`) when done."""

    def __init__(self, socket: str, *, timeout: float = DEFAULT_TIMEOUT_S):
        self.socket = os.path.abspath(socket)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            "unix:" + self.socket,
            options=[
                # A Unix socket is never proxied; keep http(s)_proxy variables out of it.
                ("grpc.enable_http_proxy", 0),
                # grpcio's default :authority for a unix: target is the socket path; the
                # daemon accepts it now, daemons before that fix answered RST_STREAM
                # PROTOCOL_ERROR, so the client still sends "localhost" (as grpc-go does).
                ("grpc.default_authority", "localhost"),
            ],
        )
        self._stub = pb_grpc.ImageBuilderStub(self._channel)

    def build(self, request: Optional["pb.BuildRequest"] = None, **fields) -> Iterator["pb.BuildEvent"]:
        """Builds (or finds) the image; yields every event, the last one `completed`.

        Takes a `BuildRequest` or the keyword arguments of `build_request`. Closing the
        generator early detaches this client; the daemon still finishes the build."""
        req = request if request is not None else build_request(**fields)
        call = self._stub.Build(req)
        answered = False
        try:
            for event in call:
                answered = True
                yield event
        except grpc.RpcError as err:
            raise _daemon_error(err, self.socket, mid_call=answered) from None
        finally:
            call.cancel()

    def build_tag(self, request: Optional["pb.BuildRequest"] = None, **fields) -> "pb.Completed":
        """Runs `build` to the end and returns its `Completed` event."""
        for event in self.build(request, **fields):
            if event.WhichOneof("event") == "completed":
                return event.completed
        raise DaemonError("INTERNAL", "the build stream ended without a completed event")

    def resolve(self, request: Optional["pb.BuildRequest"] = None, **fields) -> "pb.BuildPlan":
        """What the request resolves to (tag, base image, Dockerfile), without engine I/O."""
        req = request if request is not None else build_request(**fields)
        return self._unary(self._stub.Resolve, req)

    def info(self) -> "pb.GetInfoResponse":
        """The daemon's version, engine, paths, limits."""
        return self._unary(self._stub.GetInfo, pb.GetInfoRequest())

    def list_builds(self) -> "pb.ListBuildsResponse":
        """Builds in flight and recently finished."""
        return self._unary(self._stub.ListBuilds, pb.ListBuildsRequest())

    def prune(self, *, older_than_seconds: int = 0, keep_storage_bytes: int = 0, dry_run: bool = False):
        """Removes the daemon's images and unused cached layers."""
        req = pb.PruneRequest(
            older_than_seconds=older_than_seconds, keep_storage_bytes=keep_storage_bytes, dry_run=dry_run
        )
        # No client deadline: removing many images may take a while; the daemon answers.
        try:
            return self._stub.Prune(req)
        except grpc.RpcError as err:
            raise _daemon_error(err, self.socket) from None

    def _unary(self, method, req):
        try:
            return method(req, timeout=self.timeout)
        except grpc.RpcError as err:
            if err.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DaemonUnavailable(self.socket, f"no answer within {self.timeout:g} s") from None
            raise _daemon_error(err, self.socket) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(socket: Optional[str] = None, *, timeout: float = DEFAULT_TIMEOUT_S) -> Client:
    """A `Client` for the daemon at `socket` (default: `default_socket()`).

    Raises `DaemonUnavailable` at once when nothing accepts connections there."""
    path = os.path.abspath(socket or default_socket())
    _check_socket(path, timeout)
    return Client(path, timeout=timeout)
