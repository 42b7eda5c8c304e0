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
    p.add_argument("--device", default=DEFAULTS.device, help="cpu, cuda[:N] (ONNX: onnxruntime-gpu, IO binding), tensorrt or auto")
    p.add_argument("--graceful-timeout", type=float, default=DEFAULTS.graceful_timeout_s,
                   help="seconds shutdown waits for requests in flight")
    p.add_argument("--log-level", default=DEFAULTS.log_level, choices=["debug", "info", "warning", "error"])
    p.add_argument("--model-name", default=None,
                   help="the model's name on the Open Inference Protocol routes /v2/models/NAME (default: the folder's name)")
    ray = p.add_argument_group("scale-out on Ray Serve (pip install bertforge[ray])")
    ray.add_argument("--engine", choices=["uvicorn", "ray"], default="uvicorn",
                     help="uvicorn: one process; ray: Ray Serve replicas of the same app behind Ray's proxy")
    ray.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (each with --threads CPU threads)")
    ray.add_argument("--max-replicas", type=int, default=None,
                     help="autoscale between --replicas and this many, adding replicas while each holds a full batch")
    ray.add_argument("--ray-address", default=None,
                     help="join a running Ray cluster (e.g. auto, ray://head:10001); default: start a local one")
    p.add_argument("--verify", action="store_true", help="check every file's sha256 against bertforge.json first")
    p.set_defaults(func=run)


def run(args):
    from pipeline.errors import BertforgeError

    if args.verify:
        from pipeline.artifacts import verify_artifact

        verify_artifact(args.model, sha256=True)

    config = ServeConfig(host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                         max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         max_inputs_per_request=args.max_inputs_per_request, max_tokens=args.max_tokens,
                         on_long_input=args.on_long_input, max_body_bytes=args.max_body_bytes, api_key=args.api_key,
                         max_text_chars=args.max_text_chars, request_timeout_s=args.request_timeout,
                         limit_concurrency=args.limit_concurrency or None, timeout_keep_alive_s=args.timeout_keep_alive,
                         num_threads=args.threads, device=args.device, graceful_timeout_s=args.graceful_timeout,
                         log_level=args.log_level, model_name=args.model_name)
    if args.engine == "uvicorn":
        if args.replicas != 1 or args.max_replicas or args.ray_address:
            raise BertforgeError("--replicas, --max-replicas and --ray-address need --engine ray")
        from serving.server import serve

        serve(args.model, config)
        return
    if args.replicas < 1 or (args.max_replicas is not None and args.max_replicas < args.replicas):
        raise BertforgeError("--replicas must be >= 1 and --max-replicas >= --replicas")
    if args.port == 0:
        raise BertforgeError("--engine ray needs a fixed --port (Ray's proxy does not take port 0)")
    try:
        from serving import ray_app
    except ImportError as e:
        raise BertforgeError(f"--engine ray needs `pip install bertforge[ray]` ({e.name} is not installed)") from None
    ray_app.run(args.model, config, args.replicas, args.max_replicas, args.ray_address)
