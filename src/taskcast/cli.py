"""Command line: `taskcast serve` runs the gateway (`taskcast demo`, with the demo page);
`taskcast task ...` drives tasks by hand; `taskcast token issue` mints an access token with the
gateway's key; `taskcast watch ID ...` follows tasks through a gateway; `taskcast webhooks`
delivers webhooks without serving HTTP.

Only this module configures logging handlers.
"""

from __future__ import annotations

import argparse
import base64
import gc
import logging
import os
import secrets
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import orjson

from taskcast import watch_cli
from taskcast.errors import TaskcastError
from taskcast.settings import Settings


def _add_settings_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    for spec in fields(Settings):
        if spec.name not in names or spec.metadata.get("secret"):
            continue  # secrets come from the environment only
        kind = {"int": int, "float": float}.get(str(spec.type), str)
        parser.add_argument(
            "--" + spec.name.replace("_", "-"),
            dest=spec.name,
            type=kind,
            default=None,
            # argparse %-formats help texts: a literal "%" must be doubled.
            help=f"{spec.metadata.get('help', '')} (env TASKCAST_{spec.name.upper()}, "
            f"default {spec.default!r})".replace("%", "%%"),
        )


def build_parser() -> argparse.ArgumentParser:
    """`serve`, `demo` and `task <action>`; every Settings field is a flag whose default is
    None, so that only flags actually given override the environment."""
    # The docstring's first paragraph is for users; the rest is for readers of this module.
    parser = argparse.ArgumentParser(prog="taskcast", description=(__doc__ or "").split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    _add_settings_flags(serve, [spec.name for spec in fields(Settings)])

    demo = commands.add_parser(
        "demo", help="the gateway plus a simulated worker and a web page with progress bars "
        "(embedded store unless --redis-url is given)")
    _add_settings_flags(demo, [spec.name for spec in fields(Settings) if spec.name != "workers"])

    webhooks = commands.add_parser(
        "webhooks", help="deliver webhooks only, without the HTTP gateway (run `taskcast serve` "
        "with --webhooks off beside it)")
    _add_settings_flags(webhooks, [
        spec.name for spec in fields(Settings)
        if spec.name in ("redis_url", "prefix", "log_level", "redis_timeout_s")
        or spec.name.startswith(("webhook_", "metrics_"))])

    task = commands.add_parser("task", help="create, advance or read a task (operator tool)")
    actions = task.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a submitted task; prints it as JSON")
    create.add_argument("--id", type=int, dest="task_id", help="use this id (default: next id)")
    create.add_argument("--type", default="", help="generation type")
    create.add_argument("--angle", default="", help="view angle")
    create.add_argument("--webhook-url", help="POST the task's states here (README, Webhooks)")
    create.add_argument("--webhook-event", dest="webhook_events", action="append",
                        choices=["start", "progress", "completed", "failed"],
                        help="an event to send (repeat; default completed and failed)")
    progress = actions.add_parser("progress", help="mark processing with a progress 0..100")
    progress.add_argument("task_id", type=int)
    progress.add_argument("progress", type=int)
    complete = actions.add_parser("complete", help="complete with an image")
    complete.add_argument("task_id", type=int)
    complete.add_argument("--image-url")
    complete.add_argument("--image-base64", help="already base64-encoded image")
    complete.add_argument("--image-file", type=Path, help="an image file to base64-encode")
    fail = actions.add_parser("fail", help="fail with an error message")
    fail.add_argument("task_id", type=int)
    fail.add_argument("error_message")
    get = actions.add_parser("get", help="print the task object as JSON")
    get.add_argument("task_id", type=int)
    for sub in (create, progress, complete, fail, get):
        _add_settings_flags(sub, ["redis_url", "prefix", "retention_s"])

    token = commands.add_parser(
        "token", help="access tokens (contract 7); the key comes from the environment")
    token_actions = token.add_subparsers(dest="action", required=True)
    issue = token_actions.add_parser(
        "issue", help="print a token for some tasks (or all), signed with TASKCAST_JWT_SECRET, "
        "or with the PEM private key in TASKCAST_JWT_PRIVATE_KEY_FILE")
    issue.add_argument("--task", dest="tasks", action="append", default=[], metavar="ID",
                       help="a task id the token opens (repeat for more)")
    issue.add_argument("--all", action="store_true", help='every task ("tasks": "*")')
    issue.add_argument("--ttl", type=float, required=True, metavar="SECONDS",
                       help="lifetime of the token")
    issue.add_argument("--algorithm", default=None,
                       help="HS256 (default with a secret), RS256 (default with a private "
                       "key), ES256, EdDSA, ...")
    issue.add_argument("--claim", action="append", default=[], metavar="NAME=JSON",
                       help="an extra claim, e.g. --claim sub='\"user-7\"'")
    _add_settings_flags(issue, ["jwt_audience", "jwt_issuer"])

    watch_cli.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return the exit status: 0 done, 1 a task command refused or
    failed, 2 unusable settings (argparse exits with 2 itself on unknown flags)."""
    args = build_parser().parse_args(argv)
    if args.command == "watch":  # a client of a gateway: no server settings
        return watch_cli.run(args)
    overrides = {spec.name: getattr(args, spec.name, None) for spec in fields(Settings)}
    try:
        settings = Settings.from_env(**overrides)
    except ValueError as exc:
        print(f"taskcast: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return _serve(settings)
    if args.command == "demo":
        if args.redis_url is None and "TASKCAST_REDIS_URL" not in os.environ:
            settings = settings.with_changes(redis_url="memory://")
        return _serve(settings, demo=True)
    if args.command == "token":
        return _issue_token(args, settings)
    if args.command == "webhooks":
        from taskcast import webhook_setup

        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return webhook_setup.run_standalone(settings)
    return _task_command(args, settings)


def _serve(settings: Settings, demo: bool = False) -> int:
    from taskcast import server
    from taskcast.access import exposure_problem, verifier_for
    from taskcast.app import GatewayApp, create_app
    from taskcast.connection import is_memory_url
    from taskcast.tokens import KeyConfigError

    if demo and settings.auth != "off" and not settings.jwt_secret:
        # The demo shows the production flow: its page gets tokens from the demo's own
        # "generation service" endpoints (demo.py), which sign with this secret.
        settings = settings.with_changes(jwt_secret=secrets.token_urlsafe(48))
    if demo and not settings.webhook_secret and settings.webhooks == "on":
        # The demo's tasks send their webhooks to the demo's own receiver page, over
        # loopback: allowed for the demo only (serve refuses loopback unless told otherwise).
        settings = settings.with_changes(
            webhook_secret="whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
            webhook_allowed_hosts=(settings.webhook_allowed_hosts
                                   or f"127.0.0.1,::1,{settings.host}"))
    from taskcast import webhook_setup

    problem = (None if demo else exposure_problem(settings)) or webhook_setup.check(settings)
    if problem is not None:
        print(f"taskcast: {problem}", file=sys.stderr)
        return 2
    try:
        verifier_for(settings)
    except KeyConfigError as exc:
        print(f"taskcast: access control: {exc}", file=sys.stderr)
        return 2
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvicorn drains connections on SIGTERM, then re-raises the signal with the handler found
    # at start-up; this one turns that into exit status 0, as a clean shutdown should be.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    _tune_gc()
    if settings.workers > 1:
        if settings.metrics_port:
            print("taskcast: --metrics-port with --workers: each process has its own metrics "
                  "and would need a port of its own; run one gateway per port instead",
                  file=sys.stderr)
            return 2
        if is_memory_url(settings.redis_url):
            print("taskcast: --workers needs a shared Redis; memory:// lives in one process",
                  file=sys.stderr)
            return 2
        # Each worker process imports the app factory, which reads the settings back from here.
        os.environ.update(settings.to_env())
        server.run_workers("taskcast.app:create_served_app", settings)
        return 0
    if demo:
        print(f"taskcast demo: open http://{settings.host}:{settings.port}/ "
              f"(store: {settings.redis_url})", file=sys.stderr, flush=True)
    server.run(GatewayApp(create_app(settings, demo=demo)), settings)
    return 0


def _tune_gc() -> None:
    """Collect young objects far less often, and never scan what start-up built.

    Each pushed frame allocates a few short-lived containers; with CPython's default thresholds
    the collector ran so often, walking the whole heap of thousands of connections, that it
    took 37-51 % of the gateway's CPU in the benchmark (bench/README.md). Reference counting
    still frees almost everything at once; only cycles wait for a collection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _issue_token(args: argparse.Namespace, settings: Settings) -> int:
    import jwt

    from taskcast.tokens import HMAC_MIN_BYTES, issue

    if bool(args.tasks) == bool(args.all):
        print("taskcast: give --task ID (one or more) or --all", file=sys.stderr)
        return 2
    private_key_file = os.environ.get("TASKCAST_JWT_PRIVATE_KEY_FILE", "")
    key: str | bytes
    if private_key_file:
        try:
            key = Path(private_key_file).read_bytes()
        except OSError as exc:
            print(f"taskcast: cannot read TASKCAST_JWT_PRIVATE_KEY_FILE: {exc}", file=sys.stderr)
            return 2
        algorithm = args.algorithm or "RS256"
    elif settings.jwt_secret:
        key, algorithm = settings.jwt_secret, args.algorithm or "HS256"
        if len(settings.jwt_secret.encode()) < HMAC_MIN_BYTES["HS256"]:
            print(f"taskcast: TASKCAST_JWT_SECRET is shorter than {HMAC_MIN_BYTES['HS256']} "
                  "bytes: no gateway accepts tokens signed with it", file=sys.stderr)
            return 2
    else:
        print("taskcast: no signing key: set TASKCAST_JWT_SECRET (the gateway's secret) or "
              "TASKCAST_JWT_PRIVATE_KEY_FILE (the private half of TASKCAST_JWT_PUBLIC_KEY_FILE)",
              file=sys.stderr)
        return 2
    claims = {}
    for item in args.claim:
        name, sep, raw = item.partition("=")
        try:
            claims[name] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            sep = ""
        if not sep or not name:
            print(f"taskcast: --claim {item!r} is not NAME=JSON", file=sys.stderr)
            return 2
    try:
        token = issue(key, "*" if args.all else args.tasks, args.ttl, algorithm=algorithm,
                      audience=settings.jwt_audience or None,
                      issuer=settings.jwt_issuer or None, claims=claims)
    except (ValueError, TypeError, NotImplementedError, jwt.PyJWTError) as exc:
        # e.g. a key that does not fit the algorithm (jwt.InvalidKeyError)
        print(f"taskcast: cannot sign: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(token + "\n")
    return 0


def _task_command(args: argparse.Namespace, settings: Settings) -> int:
    from taskcast.producer import SyncProducer
    producer = SyncProducer.from_url(
        settings.redis_url, prefix=settings.prefix, retention_s=settings.retention_s
    )
    try:
        if args.action == "create":
            task = producer.create(task_id=args.task_id, type=args.type, angle=args.angle,
                                   webhook_url=args.webhook_url,
                                   webhook_events=args.webhook_events)
        elif args.action == "progress":
            task = producer.progress(args.task_id, args.progress)
        elif args.action == "complete":
            image: str | bytes | None = args.image_base64
            if args.image_file is not None:
                image = args.image_file.read_bytes()
            task = producer.complete(args.task_id, image_url=args.image_url, image_base64=image)
        elif args.action == "fail":
            task = producer.fail(args.task_id, args.error_message)
        else:
            task = producer.get(args.task_id)
    except (TaskcastError, ValueError) as exc:
        print(f"taskcast: {exc}", file=sys.stderr)
        return 1
    finally:
        producer.close()
    sys.stdout.write(orjson.dumps(task.to_dict()).decode() + "\n")
    return 0
