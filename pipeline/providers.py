"""Where a model runs: ONNX Runtime execution providers and torch devices from one `device` setting.

`device` is one of "auto", "cpu", "cuda" (or "cuda:N") and "tensorrt". Asking for a GPU that is not
there is an error naming what is missing, never a silent fall back to the CPU: a benchmark row or a
server that claims CUDA must run on CUDA. "auto" is the only setting that falls back, and it never
picks TensorRT (its engines take minutes to build on first use).

No torch import at module level: the ONNX serving path stays free of it.
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import BertforgeError

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TENSORRT_EP = "TensorrtExecutionProvider"
# ONNX Runtime's SkipLayerNormalization CPU kernel (onnxruntime 1.31) was measured 7x slower than the Add and
# LayerNormalization it replaces (249 against 34 us on a 128 x 384 input), which made dynamic-int8 MiniLM-L6 graphs
# 1.2-1.7x slower at batch 1 (`benchmarks/ort_fusions.py`, `benchmarks/results/ort_fusions.json`). CPU sessions skip that
# fusion and the fused CPU export leaves it out; the GPU kernels keep it.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def parse_device(device: str) -> tuple[str, int]:
    """("cuda", 1) from "cuda:1"; the kind must be one of DEVICES."""
    kind, _, index = str(device).strip().lower().partition(":")
    if kind not in DEVICES or (index and (kind not in ("cuda", "tensorrt") or not index.isdigit())):
        raise BertforgeError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), not {device!r}")
    return kind, int(index or 0)


def ort_available() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise BertforgeError("ONNX models need onnxruntime (pip install onnxruntime, or onnxruntime-gpu for CUDA)") from None
    return list(ort.get_available_providers())


def select_providers(device: str = "auto", available: list[str] | None = None) -> list:
    """The `providers` list for `onnxruntime.InferenceSession`, best first, CPU last as ORT's own
    fallback for the few operators a GPU provider lacks. `available`: ORT's list (default: this
    installation's), a parameter so the choice can be tested anywhere."""
    kind, index = parse_device(device)
    available = ort_available() if available is None else list(available)
    cuda = (CUDA_EP, {"device_id": index})
    if kind == "cpu" or (kind == "auto" and CUDA_EP not in available):
        return [CPU_EP]
    if kind == "auto":
        return [cuda, CPU_EP]
    if kind == "cuda":
        if CUDA_EP not in available:
            raise BertforgeError(f"device {device} requested but onnxruntime has no {CUDA_EP} "
                                 f"(install onnxruntime-gpu; this one has {', '.join(available) or 'none'})")
        return [cuda, CPU_EP]
    if TENSORRT_EP not in available:
        raise BertforgeError(f"device {device} requested but onnxruntime has no {TENSORRT_EP} "
                             "(install onnxruntime-gpu built with TensorRT, and TensorRT's libraries)")
    return [(TENSORRT_EP, {"device_id": index})] + ([cuda] if CUDA_EP in available else []) + [CPU_EP]


def disabled_optimizers(providers: list) -> list[str]:
    """The session optimizers to turn off for `providers` (the `disabled_optimizers` of an InferenceSession)."""
    return list(CPU_DISABLED_OPTIMIZERS) if provider_name(providers[0]) == CPU_EP else []


def provider_name(entry) -> str:
    return entry[0] if isinstance(entry, tuple) else entry


def on_gpu(session) -> bool:
    """Whether a session really runs on a GPU provider (ORT falls back to CPU when one fails to load)."""
    return session.get_providers()[0] in (CUDA_EP, TENSORRT_EP)


def check_placement(session, device: str) -> None:
    """A session asked to run on a GPU that ORT quietly put on the CPU (the provider is installed but
    its CUDA libraries did not load) is an error, like a provider that is missing."""
    if parse_device(device)[0] in ("cuda", "tensorrt") and not on_gpu(session):
        raise BertforgeError(f"device {device} requested but onnxruntime could not start its GPU provider and fell "
                             f"back to {session.get_providers()[0]} (CUDA/cuDNN libraries missing or mismatched?)")


def torch_device(device: str = "auto") -> str:
    """A torch device string; "cuda" when torch sees no GPU is an error, "auto" falls back to "cpu"."""
    import torch

    kind, index = parse_device(device)
    if kind == "tensorrt":
        raise BertforgeError("device tensorrt is an ONNX Runtime provider: PyTorch models run on cpu or cuda")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible GPU"
        raise BertforgeError(f"device {device} requested but torch sees no CUDA device ({build})")
    if index >= torch.cuda.device_count():
        raise BertforgeError(f"device {device} requested but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return f"cuda:{index}"


class BoundRunner:
    """Runs a GPU session with IO binding: the batch (formed on the host) is copied to the device once,
    the logits come back once, and ORT allocates nothing on the host in between. On a CPU session it is
    a plain `session.run`. A benchmark binds once (`bind`) and times `run_bound` alone: the inputs stay
    on the device and the outputs are left there."""

    def __init__(self, session, device_id: int = 0):
        self.session = session
        self.device_id = device_id
        self.gpu = on_gpu(session)
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def bind(self, feed: dict[str, np.ndarray]):
        """An IoBinding with `feed` copied to the device (the one copy in)."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, array in feed.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", self.device_id)
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cuda", self.device_id)
        return binding

    def run_bound(self, binding) -> None:
        self.session.run_with_iobinding(binding)

    def __call__(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self.gpu:
            return self.session.run(None, feed)
        binding = self.bind(feed)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()  # the one copy out
