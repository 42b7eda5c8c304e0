"""`bertforge serve --engine ray`: the same app (routes, batcher, predictor) as Ray Serve replicas.

Each replica builds the app of serving/app.py on its own worker process: one model session, one batcher,
the same HTTP contract. Ray's proxy spreads requests over replicas, and its autoscaler adds replicas while
each holds more than `target_ongoing_requests`. On a Ray cluster (Ray's cluster launcher or KubeRay) the
replicas land on any node with the CPUs they ask for. Also runnable as
`serve run serving.ray_app:build model=/path/to/artifact replicas=2`.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from ray import serve

from serving.config import ServeConfig

APP_NAME = "bertforge"


@serve.ingress()
class BertforgeReplica:
    """Built on the replica, not the driver: the model loads where it runs."""

    def __init__(self, model_dir: str, config: ServeConfig):
        self.model_dir, self.config = model_dir, config

    def __serve_build_asgi_app__(self):
        from serving.app import create_app

        return create_app(self.model_dir, self.config)


def deployment(model_dir: str | Path, config: ServeConfig, replicas: int = 1, max_replicas: int | None = None):
    """The bound Ray Serve application: `replicas` of them, or autoscaled between `replicas` and `max_replicas`."""
    options = {
        "name": APP_NAME,
        # each replica takes as many CPUs as its runtime threads, so Ray packs replicas onto cores
        "ray_actor_options": {"num_cpus": config.num_threads or 1},
        # Ray's default (5 in flight per replica) would starve the batcher: admit what its queue admits
        "max_ongoing_requests": config.max_queue,
        "graceful_shutdown_timeout_s": config.graceful_timeout_s,
    }
    if max_replicas and max_replicas > replicas:
        options["autoscaling_config"] = {
            "min_replicas": replicas, "max_replicas": max_replicas,
            # a replica is busy once it holds a full batch in flight
            "target_ongoing_requests": config.max_batch_size,
            "upscale_delay_s": 10, "downscale_delay_s": 60,
        }
    else:
        options["num_replicas"] = replicas
    return serve.deployment(BertforgeReplica, **options).bind(str(model_dir), config)


def build(args: dict):
    """`serve run serving.ray_app:build model=DIR [replicas=N] [max_replicas=M] [threads=T] [model_name=NAME]`."""
    config = ServeConfig(num_threads=int(args.get("threads", 1)), model_name=args.get("model_name"))
    return deployment(args["model"], config, int(args.get("replicas", 1)),
                      int(args["max_replicas"]) if args.get("max_replicas") else None)


def run(model_dir: str | Path, config: ServeConfig, replicas: int = 1, max_replicas: int | None = None,
        address: str | None = None) -> None:
    """Start (or join, with `address`) a Ray cluster, deploy, and serve until SIGINT/SIGTERM."""
    import logging

    import ray

    from pipeline.errors import BertforgeError

    if not Path(model_dir).is_dir():
        raise BertforgeError(f"model folder {model_dir} does not exist (Ray replicas load it by path)")
    log = logging.getLogger("bertforge.serve")
    # a local cluster's workers inherit this process's environment (PYTHONPATH included); on a cluster,
    # every node needs bertforge installed and the artifact at the same path
    # Ray Serve kills an HTTP proxy that is not ready within 5 s of its start; on a loaded small machine its
    # worker takes longer than that to import, and `serve.start` then fails. The controller and proxy run in
    # workers that inherit this environment, so a later ready check is what this buys; a user's value stands.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(deployment(model_dir, config, replicas, max_replicas), name=APP_NAME, route_prefix="/")
        running = serve.status().applications[APP_NAME].deployments[APP_NAME].replica_states.get("RUNNING", 0)
        log.info("ray serve: %d replica(s) running on http://%s:%d", running, config.host, config.port)
        print(f"replicas running: {running}", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
