"""AWS SAM CLI integration: `LambdaImage.build` asks lambda-imaged for the image.

SAM CLI (checked against 1.170.0) makes one `LambdaImage` per command in
`InvokeContext.lambda_runtime`, and `LambdaContainer._get_image` calls its `build(runtime,
packagetype, image, layers, architecture, function_name=...)` for every container it starts
(`sam local invoke`, `start-api`, `start-lambda`). Other modules keep their own reference to
the class, so the module attribute cannot be swapped; `patch_lambda_image` wraps the method on
the class instead (the `.pth` hook in `_sam_hook` calls it once SAM's module is loaded).

The wrapped `build` does what SAM's does up to the point of building, then lets the daemon
decide and build:
- layers come from SAM's own `layer_downloader.download_all(layers, force_image_build)`, so a
  template layer is its logical ID + resolved ContentUri and an ARN layer is SAM's name for it
  + the directory SAM downloaded it to;
- the tag SAM would return is computed with SAM's own helpers and compared with the daemon's
  `Resolve` answer: they agree for every well-formed reference; where they do not (an image
  reference with a registry port or a digest, which SAM mangles) SAM's own builder runs, since
  SAM decides by the tag's spelling whether to pull it;
- `invoke_images` (SAM's `--invoke-image`), `architecture`, `skip_pull_image` (SAM forces it
  for image functions) and `force_image_build` go into the request;
- the daemon's events are written to SAM's stream the way SAM writes its own build
  ("Building image..." and a dot per engine message), warnings as lines;
- the answer's pinned tag (`Completed.pinned_tag`: SAM's tag plus 16 hex digits of the image
  ID, set for images with layers) is returned to SAM instead of SAM's tag, which another
  function whose layers share names may move at any moment; it starts with SAM's
  `samcli/lambda` repository, so SAM's container manager uses it without a pull. It is checked
  in SAM's own engine (the daemon must build into the engine SAM runs containers in), so
  `get_config` and container creation work unchanged.

Whenever the daemon cannot do it — unreachable, an error status, a different engine — SAM's
original `build` runs, after one warning that says why. Enabled by `LAMBDA_IMAGED_SOCKET`
(a socket path), or `LAMBDA_IMAGED=1` with the daemon on its default socket;
`LAMBDA_IMAGED=0` turns it off.
"""

import functools
import hashlib
import inspect
import logging
import os
import re
import sys
import threading
import time
from typing import Callable, List, Optional

# A child of SAM's "samcli" logger: SAM shows its INFO lines by default, DEBUG with --debug.
LOG = logging.getLogger("samcli.lambda_imaged")

ENV_SOCKET = "LAMBDA_IMAGED_SOCKET"
ENV_ENABLE = "LAMBDA_IMAGED"
_OFF = {"0", "false", "no", "off"}
_ON = {"1", "true", "yes", "on"}

_PARAMS = ("self", "runtime", "packagetype", "image", "layers", "architecture", "stream", "function_name")
_MARK = "__lambda_imaged__"

_REASONS = {
    1: "up to date",
    2: "no image yet",
    3: "--force-image-build",
    4: "the base image changed",
    5: "a layer changed",
    6: "the runtime interface emulator changed",
    7: "the image definition changed",
    8: "pulled from the fleet's registry cache, not built",
}
REASON_REGISTRY_HIT = 8

# One "unreachable" warning per process (start-lambda / start-api build many times); every
# later build still tries the daemon first, quietly, so it is used again once it is back.
_warned_unreachable = False
_warn_lock = threading.Lock()


def enabled() -> bool:
    """True when the environment asks for the daemon (it may still be unreachable)."""
    flag = os.environ.get(ENV_ENABLE, "").strip().lower()
    if flag in _OFF:
        return False
    return bool(os.environ.get(ENV_SOCKET)) or flag in _ON


def socket_path() -> Optional[str]:
    """The daemon socket to use, or None when the integration is off.

    `LAMBDA_IMAGED_SOCKET` wins; with `LAMBDA_IMAGED=1` the daemon's default socket for this
    user, or the system socket, whichever exists (the first when neither does)."""
    if not enabled():
        return None
    explicit = os.environ.get(ENV_SOCKET)
    if explicit:
        return explicit
    from .client import SYSTEM_SOCKET, default_socket

    candidates = [default_socket(), SYSTEM_SOCKET]
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    return candidates[0]


def patch_lambda_image(cls) -> bool:
    """Wraps `cls.build` (SAM's `LambdaImage`) so builds go to the daemon. Idempotent.

    Returns False, leaving SAM untouched, when `build` does not have the signature this
    integration was written for (a SAM version that changed it)."""
    original = cls.__dict__.get("build")
    if original is None or getattr(original, _MARK, False):
        return getattr(original, _MARK, False)
    signature = inspect.signature(original)
    if tuple(signature.parameters) != _PARAMS:
        LOG.debug("lambda-imaged: LambdaImage.build%s is not the expected signature; not patched", signature)
        return False

    @functools.wraps(original)
    def build(self, *args, **kwargs):
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return original(self, *args, **kwargs)
        bound.apply_defaults()
        return build_with_daemon(original, **bound.arguments)

    setattr(build, _MARK, True)
    build.__wrapped_sam_build__ = original
    cls.build = build
    return True


def build_with_daemon(
    original: Callable, self, runtime, packagetype, image, layers, architecture, stream=None, function_name=None
):
    """SAM's `LambdaImage.build`, with the image built by the daemon when it is enabled."""

    def sam_build():
        return original(self, runtime, packagetype, image, layers, architecture, stream, function_name)

    sock = socket_path()
    if sock is None:
        return sam_build()

    from samcli.lib.utils.packagetype import IMAGE, ZIP

    if packagetype not in (ZIP, IMAGE):
        return sam_build()  # SAM raises its own error for this

    try:
        from .client import DaemonError, DaemonUnavailable, connect
    except Exception as err:  # noqa: BLE001 - a broken install must not break SAM
        _warn(f"the lambda-imaged client cannot be loaded ({err}); SAM builds the image itself")
        return sam_build()

    what = "the image"
    try:
        # Before SAM's downloader runs, so a dead daemon costs nothing (connect fails at once).
        with connect(sock) as daemon:
            # As SAM's build(): an image function's image is never pulled, and local layers are
            # resolved (ARN layers downloaded) by SAM's own downloader before anything else.
            # Its errors (no credentials for an ARN layer, ...) are SAM's and reach the user.
            if image:
                self.skip_pull_image = True
            expected, request = image_request(
                self, runtime, packagetype, image, layers, architecture, function_name, self.skip_pull_image
            )
            what = expected
            plan = daemon.resolve(request)
            if plan.tag != expected:
                # SAM's tag for a reference with a registry port or a digest is malformed, and
                # SAM decides by its spelling whether to pull it: leave those to SAM.
                LOG.info("lambda-imaged: SAM names this image %s, the daemon %s; SAM builds it", expected, plan.tag)
                return sam_build()
            completed = _stream_build(daemon, request, stream)
        if completed.tag != expected:  # the daemon resolved it to this tag a moment ago
            _warn(f"lambda-imaged built {completed.tag}, not {expected}; SAM builds it itself")
            return sam_build()
        # The pinned tag names exactly this image: SAM's tag hashes layer names only, so
        # another function (a nested stack, another template) can move the tag before SAM
        # creates its container. SAM treats a "samcli/lambda..." name as local (no pull).
        answer = getattr(completed, "pinned_tag", "") or completed.tag
        found_id, built_by_daemon = _image_in_sams_engine(self, answer)
    except DaemonUnavailable as err:
        if err.broke:  # it answered, then went away: say so each time, not "not reachable"
            _warn(f"{err.message}; SAM builds {what} itself")
        else:
            _warn_unreachable(sock, err.reason)
        return sam_build()
    except DaemonError as err:
        _warn(f"lambda-imaged could not build {what} ({err.code}: {err.message}); SAM builds it itself")
        return sam_build()
    except Exception as err:  # noqa: BLE001 - never worse off than SAM alone
        if _is_sams_own(err):
            raise
        _warn(f"lambda-imaged failed unexpectedly building {what} ({err!r}); SAM builds it itself")
        return sam_build()

    if found_id != completed.image_id and not built_by_daemon:
        _warn(
            f"lambda-imaged built {expected} as {completed.image_id}, but SAM's container engine has "
            f"{found_id or 'no such image'} (do both use the same DOCKER_HOST?); SAM builds it itself"
        )
        return sam_build()
    if found_id != completed.image_id:
        # Daemons before "inspect fresh after a build" could report the image the tag named
        # before the build; a lambda-imaged image under the tag in SAM's engine is good enough.
        LOG.debug("lambda-imaged reported %s, SAM's engine has %s", completed.image_id, found_id)
    return answer


def image_request(builder, runtime, packagetype, image, layers, architecture, function_name, skip_pull_image):
    """(the tag SAM's `LambdaImage.build` returns, the daemon's `BuildRequest`) for one image.

    `builder` is SAM's `LambdaImage` (its layer downloader, `invoke_images` and
    `force_image_build` are used); `layers` are SAM's `LayerVersion`s in the function's order,
    downloaded (ARN layers) or resolved (template layers) here by SAM's own `download_all`,
    whose errors — no credentials for an ARN layer not in SAM's layer cache, ... — are SAM's and
    propagate. A zip layer goes to the daemon as its archive (see `patch_lambda_runtime`).
    The drop-in and `lambda-imaged-prewarm` both build their requests here, so a prewarmed
    image is the one the next invoke asks for."""
    from samcli.lib.utils.packagetype import ZIP

    downloaded = []
    if layers and packagetype == ZIP:
        downloaded = builder.layer_downloader.download_all(layers, builder.force_image_build)
    expected = sam_tag(builder, runtime, packagetype, image, downloaded, architecture, function_name)
    return expected, _request(
        builder, runtime, packagetype == ZIP, image, downloaded, architecture, function_name, skip_pull_image
    )


def _request(self, runtime, is_zip, image, downloaded, architecture, function_name, skip_pull_image):
    from .client import build_request

    return build_request(
        package_type="zip" if is_zip else "image",
        runtime=runtime if is_zip else "",
        image=image or "",
        architecture=architecture,
        layers=[(layer.name, layer_source(layer)) for layer in downloaded],
        invoke_images=self.invoke_images or None,
        function_name=function_name or "",
        skip_pull_image=skip_pull_image,
        force_image_build=self.force_image_build,
    )


# Set by the wrapped `LambdaRuntime._unarchived_layer` on SAM's unarchived copy of a zip layer:
# the absolute path of the archive it was unarchived from.
_ARCHIVE = "__lambda_imaged_archive__"


def layer_source(layer) -> str:
    """The path the daemon gets for SAM's `LayerVersion`: the zip archive a layer was unarchived
    from when SAM unarchived it, else its `codeuri` (a directory, or SAM's layer cache entry)."""
    return getattr(layer, _ARCHIVE, None) or str(layer.codeuri)


def patch_lambda_runtime(cls) -> bool:
    """Wraps `cls._unarchived_layer` (SAM's `LambdaRuntime`) so that SAM's unarchived copy of a
    zip layer remembers the archive. Idempotent; False (SAM untouched) when the method is not
    there.

    SAM (`samcli/local/lambdafn/runtime.py`, `_unarchived_layer` / `_get_code_dir`) unzips a
    layer whose ContentUri is a `.zip` into a new temporary directory on every invoke, with
    fresh file times, before `LambdaImage.build` sees it; given that directory, the daemon
    would see a new tree and rebuild every time. The daemon extracts zips itself, once per
    content, so the drop-in hands it the archive (`layer_source`). SAM's own builder, when it
    runs, still gets the unarchived directory."""
    original = cls.__dict__.get("_unarchived_layer")
    if original is None or getattr(original, _MARK, False):
        return bool(original is not None)

    @functools.wraps(original)
    def unarchived_layer(self, layer):
        copy = original(self, layer)
        codeuri = getattr(layer, "codeuri", None)
        if copy is not layer and isinstance(codeuri, str) and os.path.isfile(codeuri):
            # `_get_code_dir` unzipped `codeuri` as given (relative to the process's directory).
            setattr(copy, _ARCHIVE, os.path.abspath(codeuri))
        return copy

    setattr(unarchived_layer, _MARK, True)
    cls._unarchived_layer = unarchived_layer
    return True


def _is_sams_own(err: Exception) -> bool:
    """Errors SAM's own build would raise the same way (its user-facing exceptions, e.g. from
    the layer downloader): they go to the user as they are, not to a second attempt."""
    return type(err).__module__.startswith("samcli.")


def sam_tag(self, runtime, packagetype, image, downloaded_layers, architecture, function_name) -> str:
    """The tag SAM's `LambdaImage.build` returns for these arguments, computed with SAM's own
    helpers (the same steps, without engine I/O)."""
    from samcli.lib.utils.packagetype import IMAGE, ZIP
    from samcli.local.docker import lambda_image as sam

    base_image = None
    tag_prefix = ""
    runtime_image_tag = None
    if packagetype == IMAGE:
        if self.invoke_images:
            base_image = self.invoke_images.get(function_name, self.invoke_images.get(None))
        if not base_image:
            base_image = image
    elif packagetype == ZIP:
        is_preview = runtime in getattr(sam, "TEST_RUNTIMES", [])
        runtime_image_tag = sam.Runtime.get_image_name_tag(runtime, architecture, is_preview=is_preview)
        if self.invoke_images:
            base_image = self.invoke_images.get(function_name, self.invoke_images.get(None))
        if not base_image:
            tag_prefix = re.split("[:-]", runtime_image_tag)[1] + "-"
            base_image = f"{sam.LambdaImage._INVOKE_REPO_PREFIX}/{runtime_image_tag}"
    if not base_image:
        raise ValueError(f"no base image for package type {packagetype!r}")

    if downloaded_layers and packagetype == ZIP:
        version = (
            runtime_image_tag
            + "-"
            + hashlib.sha256("-".join(layer.name for layer in downloaded_layers).encode("utf-8")).hexdigest()[0:25]
        )
        return f"{sam.LambdaImage._SAM_CLI_REPO_NAME}-{version}"
    image_repo = base_image.split(":")[0].replace("@", "")
    return f"{image_repo}:{tag_prefix}{sam.RAPID_IMAGE_TAG_PREFIX}-{architecture}"


def _stream_build(daemon, request, stream):
    """Runs the build, writing progress to SAM's stream as SAM does; returns `Completed`."""
    from samcli.lib.utils.stream_writer import StreamWriter

    writer = stream or StreamWriter(sys.stderr)
    building = False
    started = time.monotonic()
    completed = None
    try:
        for event in daemon.build(request):
            kind = event.WhichOneof("event")
            if kind == "completed":
                completed = event.completed
            elif kind == "warning":
                _newline_if(building, writer)
                building = False
                writer.write_str(f"lambda-imaged: {event.warning.message}{os.linesep}")
                writer.flush()
            elif kind in ("log", "queued", "pull_progress"):
                if not building:
                    writer.write_str("Building image (lambda-imaged)...")
                    building = True
                if kind != "pull_progress" or not event.pull_progress.layer:
                    writer.write_str(".")
                writer.flush()
    finally:
        _newline_if(building, writer)
    if completed is None:
        from .client import DaemonError

        raise DaemonError("INTERNAL", "the build stream ended without a completed event")
    if completed.cached:
        LOG.info("lambda-imaged: image %s is up to date", completed.tag)
    elif completed.reason == REASON_REGISTRY_HIT:
        LOG.info(
            "lambda-imaged: pulled %s from the fleet's registry cache in %.2f s",
            completed.tag,
            time.monotonic() - started,
        )
    else:
        why = _REASONS.get(completed.reason, "rebuilt")
        if completed.changed_layer:
            why = f"{why}: {completed.changed_layer}"
        LOG.info("lambda-imaged: built %s (%s) in %.2f s", completed.tag, why, time.monotonic() - started)
    return completed


def _newline_if(flag, writer):
    if flag:
        writer.write_str(os.linesep)
        writer.flush()


FINGERPRINT_LABEL = "io.lambda-imaged.fingerprint"


def _image_in_sams_engine(self, tag):
    """(ID, built by lambda-imaged) of the image `tag` names in the engine SAM talks to;
    (None, False) when there is none."""
    import docker

    try:
        image = self.docker_client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None, False
    labels = (image.attrs.get("Config") or {}).get("Labels") or {}
    return image.id, FINGERPRINT_LABEL in labels


def _warn_unreachable(sock: str, reason: str) -> None:
    global _warned_unreachable
    with _warn_lock:
        if _warned_unreachable:
            LOG.debug("lambda-imaged still unreachable at %s (%s)", sock, reason)
            return
        _warned_unreachable = True
    _warn(
        f"lambda-imaged is not reachable at {sock} ({reason}); SAM builds images itself. "
        f"Start the daemon, or unset {ENV_SOCKET} / set {ENV_ENABLE}=0 to silence this."
    )


def _warn(message: str) -> None:
    LOG.warning("Warning: %s", message)


def installed_in(cls) -> bool:
    """Whether `cls.build` (SAM's LambdaImage) is the daemon-aware wrapper."""
    return bool(getattr(cls.__dict__.get("build"), _MARK, False))


__all__: List[str] = [
    "build_with_daemon",
    "enabled",
    "image_request",
    "installed_in",
    "layer_source",
    "patch_lambda_image",
    "patch_lambda_runtime",
    "sam_tag",
    "socket_path",
]
