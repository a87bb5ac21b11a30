"""Prewarm: every function's image of a SAM template, built by the daemon before it is asked for.

`lambda-imaged-prewarm` (the console script, `main`) and the background prewarm inside
`sam local start-api` / `start-lambda` (`start_in_background`) read the template with the
SAM CLI installation they run in — never a parser of our own:

- `InvokeContext` (samcli/commands/local/cli_common/invoke_context.py), as `sam local invoke`
  makes it: `SamLocalStackProvider.get_stacks` (nested `AWS::Serverless::Application` /
  `AWS::CloudFormation::Stack` with a local `Location`, parameters and `--parameter-overrides`,
  `AWS::Region`), `SamFunctionProvider` (Globals, `!Ref` layers, ARN layers, `Architectures`,
  IMAGE functions), SAM's `LayerDownloader` (its layer cache) and `LambdaImage`
  (`--invoke-image`, `--skip-pull-image`, `--force-image-build`);
- the template SAM's `-t` option picks by default (`.aws-sam/build/template.yaml` when
  `sam build` made one, else `template.yaml` / `template.yml`: `get_or_default_template_file_name`);
- per function, the arguments `LambdaContainer` gives `LambdaImage.build` (runtime, package
  type, `ImageUri`, layers, architecture, the function's full path), turned into the daemon's
  request and SAM's tag by `sam.image_request`, which the drop-in uses on every invoke: a
  prewarmed image is exactly the one the next invoke asks for.

Distinct tags are built in parallel (at most `--jobs` at once; functions sharing a tag share
one build). A function that cannot be prepared — an unsupported runtime, an ARN layer not in
SAM's layer cache without credentials to download it, a request the daemon refuses — is named
with the reason; the others are still built.
"""

import argparse
import copy
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

LOG = logging.getLogger("samcli.lambda_imaged")

ENV_PREWARM = "LAMBDA_IMAGED_PREWARM"
DEFAULT_JOBS = 4

# Exit codes of `lambda-imaged-prewarm`.
EXIT_READY = 0
EXIT_NOT_ALL_READY = 1
EXIT_USAGE = 2


@dataclass
class Job:
    """One image to build: SAM's tag, the daemon's request, the functions that run in it."""

    tag: str
    request: object
    functions: List[str] = field(default_factory=list)


@dataclass
class Failure:
    """A function whose image cannot be prepared, and why (SAM's or the daemon's words)."""

    function: str
    reason: str


@dataclass
class Outcome:
    """How one job ended: `ready` with the daemon's `Completed`, or an error message."""

    job: Job
    completed: object = None
    error: Optional[str] = None
    seconds: float = 0.0

    @property
    def ready(self) -> bool:
        return self.completed is not None


def plan(builder, functions) -> Tuple[List[Job], List[Failure]]:
    """The jobs for SAM's `Function`s (one per distinct tag, in template order) and the
    functions that cannot be prepared. `builder` is SAM's `LambdaImage` of the command.

    Mirrors `LambdaRuntime.create` → `LambdaContainer.__init__` → `LambdaImage.build`: the
    runtime check SAM makes first, `image_request` for the rest. The function's own layer
    objects are copied first: SAM's downloader rewrites their `codeuri`, and in
    `sam local start-*` the provider's objects are SAM's."""
    from samcli.lib.utils.packagetype import IMAGE
    from samcli.local.docker.lambda_container import INVALID_RUNTIME_MESSAGE, Runtime

    from .sam import image_request

    jobs: Dict[str, Job] = {}
    failures: List[Failure] = []
    for function in functions:
        name = function.full_path
        if function.packagetype != IMAGE and not Runtime.has_value(function.runtime):
            failures.append(Failure(name, INVALID_RUNTIME_MESSAGE.format(runtime=function.runtime)))
            continue
        # SAM's build sets skip_pull_image on its shared LambdaImage for an image function;
        # a request of its own here, so the other functions' requests stay as SAM makes them.
        skip_pull = True if function.imageuri else bool(builder.skip_pull_image)
        try:
            tag, request = image_request(
                builder,
                function.runtime,
                function.packagetype,
                function.imageuri,
                copy.deepcopy(function.layers),
                function.architecture,
                name,
                skip_pull,
            )
        except Exception as err:  # noqa: BLE001 - SAM's own errors (credentials, ...) name the cause
            failures.append(Failure(name, _describe(err)))
            continue
        jobs.setdefault(tag, Job(tag, request)).functions.append(name)
    return list(jobs.values()), failures


def _describe(err: Exception) -> str:
    text = str(err).strip() or type(err).__name__
    return text if type(err).__module__.startswith("samcli.") else f"{type(err).__name__}: {text}"


def build_all(daemon, jobs: Sequence[Job], parallel: int, report: Callable[..., None]) -> List[Outcome]:
    """Builds every job on `daemon` (a `Client`), at most `parallel` at once; `report(kind,
    job, **details)` is called from the worker threads as a build advances ("start",
    "building", "ready", "failed"). Returns the outcomes in `jobs` order."""
    from .client import DaemonError

    def run(job: Job) -> Outcome:
        started = time.monotonic()
        report("start", job)
        try:
            plan_tag = daemon.resolve(job.request).tag
            if plan_tag != job.tag:
                # sam.build_with_daemon leaves these to SAM's own builder (a registry port or a
                # digest in the image reference): the daemon cannot prepare SAM's image.
                raise DaemonError(
                    "FAILED_PRECONDITION",
                    f"SAM names this image {job.tag}, the daemon {plan_tag}; SAM builds it itself",
                )
            completed = None
            for event in daemon.build(job.request):
                kind = event.WhichOneof("event")
                if kind == "completed":
                    completed = event.completed
                elif kind == "warning":
                    report("warning", job, message=event.warning.message)
                elif kind in ("log", "pull_progress"):
                    report("building", job)
            if completed is None:
                raise DaemonError("INTERNAL", "the build stream ended without a completed event")
            outcome = Outcome(job, completed=completed, seconds=time.monotonic() - started)
            report("ready", job, outcome=outcome)
        except DaemonError as err:
            outcome = Outcome(job, error=f"{err.code}: {err.message}", seconds=time.monotonic() - started)
            report("failed", job, outcome=outcome)
        return outcome

    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="lambda-imaged-prewarm") as pool:
        return list(pool.map(run, jobs))


# ------------------------------------------------------------------ the console script


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lambda-imaged-prewarm",
        description=(
            "Build every function's local emulation image of a SAM template with lambda-imaged, "
            "exactly as `sam local invoke` would ask for it. Exit status 0 only when every image is ready."
        ),
    )
    parser.add_argument(
        "-t",
        "--template",
        "--template-file",
        default=None,
        help="the SAM template (default as SAM: .aws-sam/build/template.yaml, else template.yaml / template.yml)",
    )
    parser.add_argument(
        "--parameter-overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="OVERRIDE",
        help="as SAM's: 'ParameterKey=K,ParameterValue=V' or 'K=V' pairs",
    )
    parser.add_argument(
        "-f",
        "--function",
        action="append",
        default=[],
        metavar="ID",
        help="only this function (logical ID or full path, e.g. Child/Fn); repeatable",
    )
    parser.add_argument("--invoke-image", action="append", default=[], help="as SAM's --invoke-image; repeatable")
    parser.add_argument("--layer-cache-basedir", default=None, help="as SAM's (default: SAM's layer cache)")
    parser.add_argument("--skip-pull-image", action="store_true", help="as SAM's")
    parser.add_argument("--force-image-build", action="store_true", help="as SAM's")
    parser.add_argument("--region", default=None, help="AWS region (AWS::Region; ARN layer downloads)")
    parser.add_argument("--profile", default=None, help="AWS profile (ARN layer downloads)")
    parser.add_argument("--socket", default=None, help="the daemon's socket (default: as the SAM drop-in picks it)")
    parser.add_argument(
        "-j", "--jobs", type=int, default=DEFAULT_JOBS, help=f"images built at once (default {DEFAULT_JOBS})"
    )
    parser.add_argument("--json", action="store_true", help="one JSON event per line on stdout")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


def _template_path(provided: Optional[str]) -> str:
    from samcli.commands._utils import options

    # SAM's own default: the option's default value makes it search the usual names.
    value = provided if provided else options._TEMPLATE_OPTION_DEFAULT_VALUE
    return options.get_or_default_template_file_name(None, None, value, include_build=True)


def _invoke_context(args: argparse.Namespace):
    from samcli.cli.types import CfnParameterOverridesType
    from samcli.commands._utils.option_value_processor import process_image_options
    from samcli.commands.local.cli_common.invoke_context import InvokeContext
    from samcli.commands.local.cli_common.options import get_default_layer_cache_dir

    overrides = CfnParameterOverridesType().convert(tuple(args.parameter_overrides), None, None)
    return InvokeContext(
        template_file=_template_path(args.template),
        parameter_overrides=overrides,
        layer_cache_basedir=args.layer_cache_basedir
        or os.environ.get("SAM_LAYER_CACHE_BASEDIR")
        or get_default_layer_cache_dir(),
        skip_pull_image=args.skip_pull_image,
        force_image_build=args.force_image_build,
        aws_region=args.region,
        aws_profile=args.profile,
        invoke_images=process_image_options(tuple(args.invoke_image)),
    )


def _functions(provider, wanted: Sequence[str]) -> Tuple[list, List[Failure]]:
    if not wanted:
        return list(provider.get_all()), []
    found, missing = [], []
    for name in wanted:
        function = provider.get(name)
        if function is None:
            missing.append(Failure(name, "no such function in the template (give its logical ID or full path)"))
        elif function not in found:
            found.append(function)
    return found, missing


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`lambda-imaged-prewarm`; returns the exit status (0: every image ready)."""
    args = parse_args(argv)
    # SAM's own warnings (its "samcli" loggers) as `sam` shows them: the message, on stderr.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    from .client import DaemonError, connect, default_socket
    from .sam import socket_path

    reporter = JsonReporter(sys.stdout) if args.json else (TtyReporter() if sys.stderr.isatty() else LineReporter())
    sock = args.socket or socket_path() or default_socket()
    try:
        context = _invoke_context(args)
        with context:
            builder = context.lambda_runtime._image_builder  # SAM's LambdaImage of this command
            functions, failures = _functions(context._function_provider, args.function)
            jobs, unpreparable = plan(builder, functions)
    except Exception as err:  # noqa: BLE001 - SAM's errors (template not found, ...) are the user's
        reporter.fatal(f"cannot read the template: {_describe(err)}")
        return EXIT_USAGE
    failures += unpreparable
    try:
        with connect(sock) as daemon:
            reporter.begin(jobs, failures)
            outcomes = build_all(daemon, jobs, args.jobs, reporter.event)
    except DaemonError as err:
        reporter.fatal(err.message)
        return EXIT_NOT_ALL_READY
    reporter.end(outcomes, failures)
    return EXIT_READY if not failures and all(o.ready for o in outcomes) else EXIT_NOT_ALL_READY


def _how(outcome: Outcome) -> str:
    from .sam import _REASONS, REASON_REGISTRY_HIT

    completed = outcome.completed
    if completed.cached:
        return "up to date"
    if completed.reason == REASON_REGISTRY_HIT:
        return "pulled from the fleet's registry cache"
    why = _REASONS.get(completed.reason, "rebuilt")
    return f"built ({why}: {completed.changed_layer})" if completed.changed_layer else f"built ({why})"


class JsonReporter:
    """One JSON object per line: {"event": "plan"|"start"|"warning"|"ready"|"failed"|"unpreparable"|"done", ...}."""

    def __init__(self, out):
        self.out = out
        self.lock = threading.Lock()

    def _emit(self, **fields):
        with self.lock:
            self.out.write(json.dumps(fields) + "\n")
            self.out.flush()

    def begin(self, jobs, failures):
        self._emit(event="plan", images=[{"tag": j.tag, "functions": j.functions} for j in jobs])
        for failure in failures:
            self._emit(event="unpreparable", function=failure.function, reason=failure.reason)

    def event(self, kind, job, outcome=None, message=None):
        if kind == "building":
            return
        fields = {"event": kind, "tag": job.tag, "functions": job.functions}
        if message is not None:
            fields["message"] = message
        if outcome is not None:
            fields["seconds"] = round(outcome.seconds, 3)
            if outcome.ready:
                fields.update(
                    cached=outcome.completed.cached,
                    reason=outcome.completed.reason,
                    image_id=outcome.completed.image_id,
                )
            else:
                fields["error"] = outcome.error
        self._emit(**fields)

    def end(self, outcomes, failures):
        ready = sum(1 for o in outcomes if o.ready)
        self._emit(event="done", ready=ready, failed=len(outcomes) - ready, unpreparable=len(failures))

    def fatal(self, message):
        self._emit(event="error", message=message)


class LineReporter:
    """Plain lines on stderr (not a terminal): one when each image is ready or failed."""

    def __init__(self, err=None):
        self.err = err or sys.stderr
        self.lock = threading.Lock()

    def _line(self, text):
        with self.lock:
            self.err.write(text + "\n")
            self.err.flush()

    def begin(self, jobs, failures):
        functions = sum(len(j.functions) for j in jobs) + len(failures)
        self._line(f"lambda-imaged-prewarm: {len(jobs)} image(s) for {functions} function(s)")

    def event(self, kind, job, outcome=None, message=None):
        if kind == "ready":
            self._line(f"ready   {job.tag}  {_how(outcome)} in {outcome.seconds:.2f} s  [{', '.join(job.functions)}]")
        elif kind == "failed":
            self._line(f"FAILED  {job.tag}  {outcome.error}  [{', '.join(job.functions)}]")
        elif kind == "warning":
            self._line(f"warning {job.tag}: {message}")

    def end(self, outcomes, failures):
        for failure in failures:
            self._line(f"cannot prepare {failure.function}: {failure.reason}")
        ready = sum(1 for o in outcomes if o.ready)
        summary = f"lambda-imaged-prewarm: {ready} of {len(outcomes)} image(s) ready"
        if failures:
            summary += f", {len(failures)} function(s) cannot be prepared"
        self._line(summary)

    def fatal(self, message):
        self._line(f"lambda-imaged-prewarm: {message}")


class TtyReporter(LineReporter):
    """A live view on the terminal (rich, which SAM CLI itself depends on): a line per image
    with its state, then the same summary as `LineReporter`."""

    def __init__(self):
        super().__init__()
        self.states: Dict[str, str] = {}
        self.functions: Dict[str, List[str]] = {}
        self.live = None

    def _render(self):
        from rich.table import Table

        grid = Table.grid(padding=(0, 2))
        for ratio in (3, 2, 2):  # tag, state, functions: each cut to the terminal's width
            grid.add_column(no_wrap=True, overflow="ellipsis", ratio=ratio)
        for tag, state in self.states.items():
            grid.add_row(tag, state, ", ".join(self.functions[tag]))
        return grid

    def begin(self, jobs, failures):
        from rich.console import Console
        from rich.live import Live

        super().begin(jobs, failures)
        for job in jobs:
            self.states[job.tag] = "waiting"
            self.functions[job.tag] = job.functions
        self.live = Live(self._render(), console=Console(file=self.err), auto_refresh=False, transient=False)
        self.live.start()

    def event(self, kind, job, outcome=None, message=None):
        with self.lock:
            if kind in ("start", "building"):
                self.states[job.tag] = "building..." if kind == "building" else "checking"
            elif kind == "ready":
                self.states[job.tag] = f"ready: {_how(outcome)} ({outcome.seconds:.1f} s)"
            elif kind == "failed":
                self.states[job.tag] = f"FAILED: {outcome.error}"
            elif kind == "warning":
                self.live.console.print(f"warning {job.tag}: {message}")
            self.live.update(self._render(), refresh=True)

    def end(self, outcomes, failures):
        if self.live is not None:
            self.live.stop()
        for outcome in outcomes:
            if not outcome.ready:
                self._line(f"FAILED  {outcome.job.tag}: {outcome.error}  [{', '.join(outcome.job.functions)}]")
        super().end(outcomes, failures)


# ------------------------------------------------------------------ inside sam local start-*


def prewarm_wanted() -> bool:
    """False when `LAMBDA_IMAGED_PREWARM` turns the background prewarm off (0/false/no/off)."""
    return os.environ.get(ENV_PREWARM, "").strip().lower() not in ("0", "false", "no", "off")


def start_in_background(invoke_context) -> Optional[threading.Thread]:
    """Prewarms every function of `invoke_context` (SAM's `InvokeContext` of `sam local
    start-api` / `start-lambda`) on a daemon thread; None when the drop-in or the prewarm is
    off. A request that arrives while its image is building joins that build in the daemon
    (one build per image, builds.rs); nothing here blocks SAM."""
    from .sam import socket_path

    sock = socket_path()
    if sock is None or not prewarm_wanted():
        return None
    try:
        builder = invoke_context.lambda_runtime._image_builder
        provider = invoke_context.local_lambda_runner.provider
    except Exception as err:  # noqa: BLE001 - a SAM that moved these: no prewarm, SAM unchanged
        LOG.debug("lambda-imaged: no prewarm (%r)", err)
        return None
    thread = threading.Thread(
        target=_prewarm_quietly,
        args=(sock, builder, list(provider.get_all())),
        name="lambda-imaged-prewarm",
        daemon=True,
    )
    thread.start()
    return thread


def _prewarm_quietly(sock, builder, functions) -> None:
    from .client import DaemonError, connect

    started = time.monotonic()
    try:
        jobs, failures = plan(builder, functions)
        with connect(sock) as daemon:
            outcomes = build_all(daemon, jobs, DEFAULT_JOBS, lambda *a, **k: None)
    except DaemonError as err:
        LOG.debug("lambda-imaged: no prewarm (%s)", err)  # the first invoke says it, once
        return
    except Exception as err:  # noqa: BLE001 - never break SAM's server
        LOG.debug("lambda-imaged: prewarm failed (%r)", err)
        return
    ready = sum(1 for o in outcomes if o.ready)
    LOG.info("lambda-imaged: prewarmed %d of %d image(s) in %.2f s", ready, len(outcomes), time.monotonic() - started)
    for outcome in outcomes:
        if not outcome.ready:
            LOG.info("lambda-imaged: could not prewarm %s: %s", outcome.job.tag, outcome.error)
    for failure in failures:
        LOG.info("lambda-imaged: not prewarmed %s: %s", failure.function, failure.reason)


def patch_service(cls) -> bool:
    """Wraps `cls.__init__` (SAM's `LocalLambdaService` or `LocalApiService`, which get the
    command's `InvokeContext` once SAM has read the template) to start the background prewarm.
    Idempotent. Only `start-lambda` and `start-api` make these services: `sam local invoke`
    (one function) prewarms nothing."""
    import functools

    from .sam import _MARK

    original = cls.__dict__.get("__init__")
    if original is None or getattr(original, _MARK, False):
        return original is not None

    @functools.wraps(original)
    def init(self, lambda_invoke_context, *args, **kwargs):
        original(self, lambda_invoke_context, *args, **kwargs)
        try:
            start_in_background(lambda_invoke_context)
        except Exception as err:  # noqa: BLE001
            LOG.debug("lambda-imaged: no prewarm (%r)", err)

    setattr(init, _MARK, True)
    cls.__init__ = init
    return True


if __name__ == "__main__":
    sys.exit(main())
