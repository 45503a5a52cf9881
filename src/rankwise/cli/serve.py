"""``rankwise serve``: serve a base model and the adapters in a folder over HTTP (OpenAI-compatible).

    rankwise serve --model <save_pretrained folder> --adapters <folder of adapter folders> [--port 8765]

Each subfolder of ``--adapters`` is an adapter named after it (rankwise or PEFT format), loaded on
first use into a cache bounded by ``--cache-mb``; requests are batched across adapters
(``rankwise.mixed_batch``). Endpoints, limits and errors: ``rankwise/serve/app.py``. Upload and delete
of adapters need a bearer token from ``RANKWISE_TOKEN`` or ``--token-file``; without one they are off.
Binds 127.0.0.1 unless ``--host`` says otherwise. SIGINT / SIGTERM: stop accepting, finish the requests
in flight (up to ``--shutdown-timeout`` seconds), then print a summary table.
"""

from __future__ import annotations

import os
from pathlib import Path


def add_parser(sub) -> None:
    from .main import positive_int

    p = sub.add_parser("serve", help="serve a model and many hot-loaded adapters over HTTP (OpenAI-compatible)")
    p.add_argument("--model", required=True, help="base model folder (save_pretrained, safetensors weights)")
    p.add_argument("--adapters", default=None, help="folder whose subfolders are adapters (rankwise or PEFT)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--model-name", default=None, help="name of the base model in requests (default: folder name)")
    p.add_argument("--token-file", default=None,
                   help="file holding the bearer token for adapter upload/delete (default: $RANKWISE_TOKEN; "
                        "neither: those endpoints are off)")
    p.add_argument("--max-batch", type=positive_int, default=32, help="most rows per batch (default 32)")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others (default 5 ms)")
    p.add_argument("--max-queue", type=positive_int, default=256,
                   help="requests waiting at most; more get 503 + Retry-After (default 256)")
    p.add_argument("--max-request-bytes", type=positive_int, default=1 << 20, help="request body limit (1 MiB)")
    p.add_argument("--max-upload-bytes", type=positive_int, default=256 << 20, help="adapter upload limit (256 MiB)")
    p.add_argument("--max-tokens", type=positive_int, default=1024, help="largest max_tokens a request may ask")
    p.add_argument("--cache-mb", type=float, default=1024.0, help="adapter cache budget in MiB (default 1024)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds to finish in-flight requests on shutdown (default 30)")


def read_token(token_file: str | None) -> str | None:
    from ..errors import ConfigError

    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"--token-file {token_file}: cannot read it ({e.strerror}).") from None
        if not token:
            raise ConfigError(f"--token-file {token_file} is empty; put the bearer token in it.")
        return token
    return os.environ.get("RANKWISE_TOKEN") or None


def build(args):
    """``(app, engine)`` from the parsed arguments (everything checked before the model loads)."""
    from ..errors import ConfigError
    from ..serve import AdapterCache, Engine, load_model
    from ..serve.app import create_app

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise ConfigError(f"--model {args.model} is not a folder; pass a save_pretrained model folder.")
    if args.adapters is not None and not Path(args.adapters).is_dir():
        raise ConfigError(f"--adapters {args.adapters} is not a folder; create it (it may be empty).")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: use 1-65535.")
    if args.batch_window_ms < 0 or args.cache_mb <= 0:
        raise ConfigError("--batch-window-ms must be ≥ 0 and --cache-mb > 0.")
    token = read_token(args.token_file)
    model, tokenizer, task = load_model(model_dir, args.device, args.dtype)
    cache = AdapterCache(model, args.adapters, max_bytes=int(args.cache_mb * (1 << 20)))
    engine = Engine(model, tokenizer, task, cache, max_batch=args.max_batch, window_s=args.batch_window_ms / 1000,
                    max_queue=args.max_queue)
    name = args.model_name or model_dir.resolve().name
    app = create_app(engine, base_name=name, token=token, max_request_bytes=args.max_request_bytes,
                     max_upload_bytes=args.max_upload_bytes, max_tokens_limit=args.max_tokens)
    return app, engine, name, token


def _run_until_signal(server) -> None:
    """Run uvicorn in a thread while this (main) thread handles SIGINT / SIGTERM: the first asks for a
    graceful shutdown (stop accepting, finish in-flight requests), a second forces it. Unlike uvicorn's
    own handlers, the signal is not raised again afterwards, so the command ends normally (exit 0)."""
    import signal
    import threading

    def stop(signum, frame):
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=server.run, name="rankwise-serve-http")
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run(args):
    import uvicorn

    from ..utils.table import format_table

    app, engine, name, token = build(args)
    print(f"rankwise serve: {engine.task} model '{name}' on http://{args.host}:{args.port} "
          f"({len(engine.cache.available())} adapter folder(s); uploads {'on' if token else 'off'})", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = uvicorn.Server(config)
    _run_until_signal(server)
    m = engine.metrics
    rows = [["requests answered", int(m.total("requests_total"))],
            ["batches run", int(m.total("batches_total"))],
            ["tokens generated", int(m.value("tokens_generated_total"))],
            ["adapter loads", engine.cache.loads],
            ["adapter evictions", engine.cache.evictions],
            ["adapters loaded at exit", len(engine.cache.loaded)]]
    print(format_table(rows, ["rankwise serve", "count"]))
    return 0
