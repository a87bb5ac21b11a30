"""Start-up hook, imported by `lambda_imaged_sam.pth` in every Python process of the environment.

It must cost nothing and never fail: when neither `LAMBDA_IMAGED_SOCKET` nor `LAMBDA_IMAGED`
asks for the daemon it does nothing at all. Otherwise it puts a finder on `sys.meta_path`
that, when one of SAM's modules in TARGETS is imported, lets the normal loader run the module
and then wraps a method of one of its classes: `LambdaImage.build` (`sam.patch_lambda_image`),
`LambdaRuntime._unarchived_layer` (`sam.patch_lambda_runtime`) and the `__init__` of the
services of `sam local start-lambda` / `start-api` (`prewarm.patch_service`). Wrapping the method on the
class reaches every module that imported the class; swapping the module attribute would not.
The finder removes itself once every target is patched.
"""

import os
import sys

# SAM's module -> (its class, our module and function that patch the class)
TARGETS = {
    "samcli.local.docker.lambda_image": ("LambdaImage", "sam", "patch_lambda_image"),
    "samcli.local.lambdafn.runtime": ("LambdaRuntime", "sam", "patch_lambda_runtime"),
    # Made only by `sam local start-lambda` / `start-api`: they start the background prewarm.
    "samcli.commands.local.lib.local_lambda_service": ("LocalLambdaService", "prewarm", "patch_service"),
    "samcli.commands.local.lib.local_api_service": ("LocalApiService", "prewarm", "patch_service"),
}
_patched = set()


def _wanted() -> bool:
    flag = os.environ.get("LAMBDA_IMAGED", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    return bool(os.environ.get("LAMBDA_IMAGED_SOCKET")) or flag in ("1", "true", "yes", "on")


def _patch(module) -> None:
    _patched.add(module.__name__)
    try:
        import importlib

        cls, ours, patcher = TARGETS[module.__name__]
        getattr(importlib.import_module(f"{__package__}.{ours}"), patcher)(getattr(module, cls))
    except Exception as err:  # noqa: BLE001 - SAM must keep working whatever happens here
        print(f"lambda-imaged: not hooked into SAM CLI ({err!r}); SAM builds images itself", file=sys.stderr)


class _Finder:
    """A meta path finder that only ever answers for TARGETS, by delegating to the others."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in TARGETS or fullname in _patched:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)
            if _patched.issuperset(TARGETS):
                _remove()

        # The loader object is this module's own (made by the path finder for this spec).
        loader.exec_module = exec_and_patch
        return spec

    def invalidate_caches(self):
        pass


_finder = _Finder()


def _remove() -> None:
    try:
        sys.meta_path.remove(_finder)
    except ValueError:
        pass


def install() -> None:
    """Patches SAM's modules now where they are loaded, the others when they are imported."""
    for name in TARGETS:
        module = sys.modules.get(name)
        if module is not None and name not in _patched:
            _patch(module)
    if not _patched.issuperset(TARGETS) and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


if _wanted():
    try:
        install()
    except Exception as _err:  # noqa: BLE001
        print(f"lambda-imaged: not hooked into SAM CLI ({_err!r})", file=sys.stderr)
