"""What `bertforge serve` can be told: one typed config, its defaults in one place."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.errors import BertforgeError


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
    api_key: str | None = None
    num_threads: int | None = None  # intra-op threads of ONNX Runtime / torch (default: the runtime's own)
    device: str = "cpu"
    graceful_timeout_s: float = 30.0  # how long shutdown waits for requests in flight
    log_level: str = "info"
    model_name: str | None = None  # the Open Inference Protocol's model name (default: the artifact folder's)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise BertforgeError(f"serve: port must be 0-65535 (0: any free port), got {self.port}")
        positive = ("max_batch_size", "max_queue", "max_inputs_per_request", "max_tokens", "max_body_bytes")
        for name in positive:
            if int(getattr(self, name)) <= 0:
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

    def public(self) -> dict:
        """The settings a client may see (GET /info): everything but the key."""
        d = asdict(self)
        d["api_key"] = bool(self.api_key)
        return d
