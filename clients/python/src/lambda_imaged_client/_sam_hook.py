"""Start-up hook, imported by `lambda_imaged_sam.pth` in every Python process of the environment.

It must cost nothing and never fail: when neither `LAMBDA_IMAGED_SOCKET` nor `LAMBDA_IMAGED`
asks for the daemon it does nothing at all. Otherwise it puts a finder on `sys.meta_path`
that, when `samcli.local.docker.lambda_image` is imported, lets the normal loader run the
module and then wraps `LambdaImage.build` (see `sam.patch_lambda_image`). Wrapping the method
on the class reaches every module that imported the class; swapping the module attribute
would not. The finder removes itself once it has patched.
"""

import os
import sys

TARGET = "samcli.local.docker.lambda_image"


def _wanted() -> bool:
    flag = os.environ.get("LAMBDA_IMAGED", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    return bool(os.environ.get("LAMBDA_IMAGED_SOCKET")) or flag in ("1", "true", "yes", "on")


def _patch(module) -> None:
    try:
        from .sam import patch_lambda_image

        patch_lambda_image(module.LambdaImage)
    except Exception as err:  # noqa: BLE001 - SAM must keep working whatever happens here
        print(f"lambda-imaged: not hooked into SAM CLI ({err!r}); SAM builds images itself", file=sys.stderr)


class _Finder:
    """A meta path finder that only ever answers for TARGET, by delegating to the others."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
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
            _remove()
            _patch(module)

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
    """Patches SAM now if it is loaded, else when it is imported."""
    module = sys.modules.get(TARGET)
    if module is not None:
        _patch(module)
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


if _wanted():
    try:
        install()
    except Exception as _err:  # noqa: BLE001
        print(f"lambda-imaged: not hooked into SAM CLI ({_err!r})", file=sys.stderr)
