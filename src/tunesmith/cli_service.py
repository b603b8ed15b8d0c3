"""The service's commands: `serve`, `worker`, `keys create|list|revoke`, `audit verify`, `keys rotate-master`.

Everything they touch lives under `$TUNESMITH_HOME` (or `--home`): the store, the keys, the blobs, the audit log.
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

from tunesmith.errors import UserError


def settings(args: argparse.Namespace):
    from tunesmith.serve.service import Service, Settings, default_base_models

    base_models = default_base_models()
    for item in getattr(args, "model", None) or []:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec or ":" in name:
            raise UserError(
                f"--model {item}: expected NAME=SPEC (a name without ':' and a registry model, a local "
                f"model directory or a run directory); fix: --model tiny=/path/to/model"
            )
        Service.run_model(spec)  # a run directory that cannot be served is refused now, not at its first request
        base_models[name] = spec
    home = Path(args.home).expanduser() if getattr(args, "home", None) else None
    kwargs = {"home": home} if home else {}
    return Settings(
        database_url=args.database_url or os.environ.get("TUNESMITH_DATABASE_URL"),
        base_models=base_models,
        max_upload_bytes=getattr(args, "max_upload_mb", 512) << 20,
        processes=getattr(args, "nproc", 1) or 1,
        reply_tokens=getattr(args, "reply_tokens", None) or Settings.reply_tokens,
        **kwargs,
        scratch=Path(args.scratch).expanduser() if getattr(args, "scratch", None) else None,
    )


def service_from(args: argparse.Namespace):
    from tunesmith.serve.service import Service

    return Service(settings(args))


def cmd_keys(args: argparse.Namespace) -> int:
    """`keys ...`; an audit log that cannot be written refuses the change (exit 2, nothing done)."""
    from tunesmith.serve.shapes import ApiError

    try:
        return _keys(args)
    except ApiError as error:
        raise UserError(f"{error.message} (tunesmith keys {args.action})") from None


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from tunesmith.serve import worker as worker_module
    from tunesmith.serve.api import DrainingServer, create_app
    from tunesmith.serve.inference import AdapterPool

    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("--tls-cert and --tls-key go together; fix: give both (PEM files) or neither")
    for path in filter(None, (args.tls_cert, args.tls_key)):
        if not Path(path).is_file():
            raise UserError(f"{path}: TLS file not found; fix: give the PEM certificate and key paths")
    for name in ("threads", "max_batch", "adapters"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.request_timeout <= 0:
        raise UserError(f"--request-timeout {args.request_timeout}: must be a number of seconds above 0")
    service = service_from(args)
    threads = args.threads or default_threads(args.workers)
    torch.set_num_threads(threads)  # generation runs on one scheduler thread per base model: its matmuls use these
    pool = AdapterPool(capacity=args.adapters, max_batch=args.max_batch, request_timeout=args.request_timeout)
    app = create_app(service, pool)
    worker = None
    if args.workers > 0:
        worker = worker_module.Worker(service, concurrency=args.workers, lease_seconds=args.lease_seconds)
        threading.Thread(target=worker.serve_forever, name="worker", daemon=True).start()
    scheme = "https" if args.tls_cert else "http"
    print(
        f"tunesmith serving on {scheme}://{args.host}:{args.port}/v1 (dashboard: /dashboard); state in "
        f"{service.settings.home}; {threads} inference thread(s), batches of up to {args.max_batch}",
        flush=True,
    )
    if worker is not None:
        print(service.describe_scratch(), flush=True)
    try:
        DrainingServer(
            app, pool, worker, host=args.host, port=args.port, ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key
        ).run()
    finally:
        if worker is not None:
            worker.stop()
    return 0


def default_threads(workers: int) -> int:
    """Torch threads for inference: every core, less half of them when a built-in worker trains beside it (two
    pools of spinning OpenMP threads on the same cores slow both, 4x on 2 cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - cores // 2) if workers > 0 else cores


def cmd_worker(args: argparse.Namespace) -> int:
    from tunesmith.serve import worker

    return worker.run(service_from(args), concurrency=args.concurrency, lease_seconds=args.lease_seconds)


def _keys(args: argparse.Namespace) -> int:
    from tunesmith.security import apikeys
    from tunesmith.security.apikeys import Scope

    service = service_from(args)
    store = service.store
    if args.action == "create":
        if not args.project:
            raise UserError(
                "keys create needs --project; fix: tunesmith keys create --project P --scope read|write|admin"
            )
        if not all(c.isalnum() or c in "-_." for c in args.project) or len(args.project) > 64:
            raise UserError(f"--project {args.project!r}: use up to 64 letters, digits, '-', '_' or '.'")
        scope = Scope.parse(args.scope)
        key = apikeys.new_key()
        with service.audited(args.project, "cli", "key.create", [key.key_id], scope=scope.value):
            store.add_key(key.key_id, args.project, scope.value, key.hash, args.name or "")
        print(
            f"created key {key.key_id} for project {args.project} (scope {scope.value}); it is shown once: {key.secret}"
        )
        return 0
    if args.action == "list":
        rows = store.keys(args.project)
        print(f"{'key id':14} {'project':20} {'scope':6} {'created':10} status")
        for row in rows:
            import time

            created = time.strftime("%Y-%m-%d", time.gmtime(row["created_at"]))
            print(
                f"{row['id']:14} {row['project_id']:20} {row['scope']:6} {created:10} "
                f"{'revoked' if row['revoked_at'] else 'active'}"
            )
        return 0
    if args.action == "revoke":
        if not args.key_id:
            raise UserError(
                "keys revoke needs the key id; fix: tunesmith keys revoke KEY_ID (see `tunesmith keys list`)"
            )
        row = store.key(args.key_id)
        if row is None:
            raise UserError(f"no key with id {args.key_id}; fix: `tunesmith keys list` shows the ids")
        if row["revoked_at"] is not None:
            print(f"key {args.key_id} was already revoked")
            return 0
        with service.audited(row["project_id"], "cli", "key.revoke", [args.key_id]):
            store.revoke_key(args.key_id)
        print(f"revoked key {args.key_id} (project {row['project_id']})")
        return 0
    if args.action == "rotate-master":
        keyring = service.blobs.keyring
        with service.audited("-", "cli", "master_key.rotate", [keyring.current]):  # the key being replaced
            new = keyring.rotate()
            count = service.blobs.rewrap_all()
        print(f"new master key {new}; {count} object(s) re-wrapped; older keys stay in {keyring.path} for old backups")
        return 0
    raise UserError(f"unknown keys action {args.action}")


def cmd_audit(args: argparse.Namespace) -> int:
    service = service_from(args)
    result = service.verify_audit()
    if result:
        print(
            f"{service.audit_log.path}: OK, {result.count} records, hash chain intact up to the head the store recorded"
        )
        return 0
    print(f"{service.audit_log.path}: TAMPERED: {result}")
    return 1


def add_parsers(commands) -> None:
    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--home", help="where the service keeps its state (default: $TUNESMITH_HOME or ~/.tunesmith)"
        )
        parser.add_argument(
            "--database-url",
            help="the store: a SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db "
            "(default: $TUNESMITH_DATABASE_URL, else a SQLite file under the home)",
        )

    def models(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--model",
            action="append",
            metavar="NAME=SPEC",
            help="offer another base model under NAME "
            "(a registry name, a local model directory or a run directory; a classifier run answers "
            "/v1/classifications); repeatable. The built-in models are offered",
        )
        parser.add_argument("--nproc", type=int, default=1, help="torch.distributed processes per training job")
        parser.add_argument("--max-upload-mb", type=int, default=512, help="largest accepted upload")
        parser.add_argument(
            "--reply-tokens",
            type=int,
            help="reinforcement jobs: the longest reply sampled, in tokens (rl.max_new_tokens; OpenAI's API has no "
            "such parameter; default 128)",
        )
        parser.add_argument(
            "--lease-seconds",
            type=float,
            default=30.0,
            help="a job whose worker has not renewed its "
            "lease for this long is taken over by another worker (and resumed)",
        )
        parser.add_argument(
            "--scratch",
            help="where a running job keeps its decrypted data and run (default: a folder "
            "on /dev/shm when it has 2 GiB free, else HOME/work); erased when the job ends",
        )

    serve = commands.add_parser("serve", help="the OpenAI-compatible fine-tuning and inference service (+ a worker)")
    common(serve)
    models(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="jobs run at once by the built-in worker (0: none; run `tunesmith worker` elsewhere)",
    )
    serve.add_argument("--adapters", type=int, default=4, help="fine-tuned adapters kept resident per base model")
    serve.add_argument(
        "--threads",
        type=int,
        help="CPU threads for inference (default: every core, half of them when the built-in worker runs)",
    )
    serve.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="replies decoded together per base model (concurrent requests, whatever their adapters, share a batch)",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds a chat or completion request may "
        "take, queueing included; a reply still being written then ends as at max_tokens",
    )
    serve.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate (with --tls-key)")
    serve.add_argument("--tls-key", help="the certificate's PEM private key")
    serve.set_defaults(handler=cmd_serve)
    worker = commands.add_parser("worker", help="run queued fine-tuning jobs from the service's store")
    common(worker)
    models(worker)
    worker.add_argument("--concurrency", type=int, default=1, help="jobs run at once")
    worker.set_defaults(handler=cmd_worker)
    keys = commands.add_parser(
        "keys",
        help="API keys: create (the key is the last word printed), list, revoke; "
        "rotate-master re-keys encryption at rest",
    )
    common(keys)
    keys.add_argument("action", choices=["create", "list", "revoke", "rotate-master"])
    keys.add_argument("key_id", nargs="?", help="revoke: the key id")
    keys.add_argument("--project", help="create: the project the key belongs to; list: only this project")
    keys.add_argument("--scope", default="read", help="create: read | write | admin (each includes the ones before)")
    keys.add_argument("--name", help="create: a note to tell keys apart")
    keys.set_defaults(handler=cmd_keys)
    audit = commands.add_parser("audit", help="verify the hash chain of the service's audit log")
    common(audit)
    audit.add_argument("action", choices=["verify"])
    audit.set_defaults(handler=cmd_audit)
