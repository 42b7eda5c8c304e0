import os

from serving.config import ServeConfig

DEFAULTS = ServeConfig()


def add_parser(sub):
    p = sub.add_parser("serve", help="serve an artifact (ONNX or PyTorch) over HTTP with dynamic batching",
                       description="POST /predict {\"inputs\": ...}; GET /healthz, /readyz, /metrics, /docs.")
    p.add_argument("--model", required=True, help="artifact folder (ONNX or PyTorch) or hub id")
    p.add_argument("--host", default=DEFAULTS.host, help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=DEFAULTS.port)
    p.add_argument("--max-batch-size", type=int, default=DEFAULTS.max_batch_size, help="inputs per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=DEFAULTS.max_wait_ms,
                   help="longest an input waits for its batch to fill")
    p.add_argument("--max-queue", type=int, default=DEFAULTS.max_queue,
                   help="inputs in flight before new requests get 429")
    p.add_argument("--max-inputs-per-request", type=int, default=DEFAULTS.max_inputs_per_request)
    p.add_argument("--max-tokens", type=int, default=DEFAULTS.max_tokens, help="tokens per input, special tokens included")
    p.add_argument("--on-long-input", choices=["truncate", "reject"], default=DEFAULTS.on_long_input)
    p.add_argument("--max-body-bytes", type=int, default=DEFAULTS.max_body_bytes)
    p.add_argument("--max-text-chars", type=int, default=DEFAULTS.max_text_chars, help="longer texts get 413")
    p.add_argument("--request-timeout", type=float, default=DEFAULTS.request_timeout_s,
                   help="seconds a request may take (body 408, answer 504); a batch running longer turns /readyz off")
    p.add_argument("--limit-concurrency", type=int, default=DEFAULTS.limit_concurrency,
                   help="open connections before uvicorn answers 503 (0: no limit)")
    p.add_argument("--timeout-keep-alive", type=float, default=DEFAULTS.timeout_keep_alive_s,
                   help="seconds an idle keep-alive connection stays open")
    p.add_argument("--api-key", default=os.environ.get("BERTFORGE_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every route but /healthz and /readyz (default: $BERTFORGE_API_KEY)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of the runtime (default: the usable cores, capped by the cgroup CPU quota)")
    p.add_argument("--device", default=DEFAULTS.device)
    p.add_argument("--graceful-timeout", type=float, default=DEFAULTS.graceful_timeout_s,
                   help="seconds shutdown waits for requests in flight")
    p.add_argument("--log-level", default=DEFAULTS.log_level, choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args):
    from serving.server import serve

    config = ServeConfig(host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                         max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         max_inputs_per_request=args.max_inputs_per_request, max_tokens=args.max_tokens,
                         on_long_input=args.on_long_input, max_body_bytes=args.max_body_bytes, api_key=args.api_key,
                         max_text_chars=args.max_text_chars, request_timeout_s=args.request_timeout,
                         limit_concurrency=args.limit_concurrency or None, timeout_keep_alive_s=args.timeout_keep_alive,
                         num_threads=args.threads, device=args.device, graceful_timeout_s=args.graceful_timeout,
                         log_level=args.log_level)
    serve(args.model, config)
