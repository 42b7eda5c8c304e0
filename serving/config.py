"""What `bertforge serve` can be told: one typed config, its defaults in one place."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import BertforgeError

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    # Dynamic batching: while the model runs, arriving inputs queue; the next batch takes what queued
    # (up to max_batch_size), so batches grow with load and an idle server adds no delay. max_wait_ms > 0
    # also holds a batch open that long after its oldest input arrived, for more to join.
    max_batch_size: int = 32
    max_wait_ms: float = 0.0
    # Backpressure: inputs admitted and not yet answered (queued + running). Past it: 429.
    max_queue: int = 512
    max_inputs_per_request: int = 64
    # Tokens per input (special tokens included); longer inputs are cut ("truncate") or refused ("reject").
    max_tokens: int = 128
    on_long_input: str = "truncate"
    max_body_bytes: int = 1_000_000
    max_text_chars: int = 100_000  # one text longer than this: 413 before tokenizing
    api_key: str | None = None  # guards every route but /healthz and /readyz
    num_threads: int | None = None  # intra-op threads of ONNX Runtime / torch (default: the CPU quota)
    device: str = "cpu"
    # A request (body read, queue and model together) answered 408/504 past this; a batch running
    # longer turns /readyz off (the model is stuck).
    request_timeout_s: float = 30.0
    # uvicorn: open connections (idle keep-alive ones too) past which it answers 503, and how long an
    # idle keep-alive connection stays open.
    limit_concurrency: int | None = 1024
    timeout_keep_alive_s: float = 5.0
    graceful_timeout_s: float = 30.0  # how long shutdown waits for requests in flight
    log_level: str = "info"
    model_name: str | None = None  # the Open Inference Protocol's model name (default: the artifact folder's)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise BertforgeError(f"serve: port must be 0-65535 (0: any free port), got {self.port}")
        positive = ("max_batch_size", "max_queue", "max_inputs_per_request", "max_tokens", "max_body_bytes",
                    "max_text_chars", "request_timeout_s", "timeout_keep_alive_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise BertforgeError(f"serve: {name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise BertforgeError(f"serve: max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.max_queue < self.max_inputs_per_request:
            raise BertforgeError(f"serve: max-queue ({self.max_queue}) must hold at least one full request "
                                 f"(max-inputs-per-request {self.max_inputs_per_request})")
        if self.on_long_input not in ("truncate", "reject"):
            raise BertforgeError(f"serve: on-long-input must be truncate or reject, got {self.on_long_input!r}")
        if self.max_tokens < 3:
            raise BertforgeError("serve: max-tokens must leave room for [CLS] and [SEP] (>= 3)")
        if self.num_threads is not None and self.num_threads <= 0:
            raise BertforgeError(f"serve: threads must be positive, got {self.num_threads}")
        if self.limit_concurrency is not None and self.limit_concurrency <= 0:
            raise BertforgeError(f"serve: limit-concurrency must be positive, got {self.limit_concurrency}")

    def resolved_threads(self) -> int:
        return self.num_threads or default_threads()

    def public(self) -> dict:
        """The settings a client may see (GET /info): everything but the key."""
        d = asdict(self)
        d["api_key"] = bool(self.api_key)
        return d


def cpu_quota(root: Path = CGROUP_ROOT) -> int | None:
    """CPUs the container may use by its cgroup CPU quota (rounded up), or None when unlimited or unknown.

    Docker's --cpus and Kubernetes' CPU limits set this, while os.cpu_count() and the affinity mask still
    report every core of the host: ONNX Runtime sizing its pool by those oversubscribes the quota and is
    throttled. cgroup v2 keeps "QUOTA PERIOD" (or "max PERIOD") in cpu.max; v1 keeps the two numbers in
    cpu/cpu.cfs_quota_us (-1: none) and cpu/cpu.cfs_period_us.
    """
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
        else:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota == "max" or int(quota) <= 0 or int(period) <= 0:
            return None
        return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return None


def default_threads(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Intra-op threads when none are asked for: the CPUs this process may run on, capped by the quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota(cgroup_root)
    return min(cpus, quota) if quota else cpus
