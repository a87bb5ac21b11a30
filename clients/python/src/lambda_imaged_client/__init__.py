"""Python client for lambda-imaged, the shared AWS Lambda emulation image builder.

# Layout
- `client`      connect(socket) -> Client: build(...) yields events, resolve(...), info(), ...
- `sam`         the AWS SAM CLI integration: LambdaImage.build goes to the daemon
- `_sam_hook`   imported by the installed `lambda_imaged_sam.pth`: patches SAM once it loads
- `v1`          stubs generated from proto/lambda_imaged/v1/ (by ../../generate.sh)

Example::

    from lambda_imaged_client import connect

    with connect("/run/lambda-imaged/lambda-imaged.sock") as daemon:
        for event in daemon.build(runtime="python3.12", layers=[("deps", "/abs/layer")]):
            print(event.WhichOneof("event"))
        print(daemon.resolve(runtime="python3.12").tag)

This module imports nothing heavy (no grpc) until a name below is used: the `.pth` hook
imports the package in every Python process of the environment.
"""

__all__ = [
    "Client",
    "DaemonError",
    "DaemonUnavailable",
    "build_request",
    "connect",
    "default_socket",
]


def __getattr__(name):
    if name in __all__:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
