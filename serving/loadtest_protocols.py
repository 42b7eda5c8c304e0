"""The wire formats `bertforge loadtest` speaks: a request body for n inputs, and the n labels read back.

Standard library only: the locustfile imports this beside itself (Locust puts the locustfile's folder on
sys.path), and gevent-patched processes must not import torch.

- bertforge: POST /predict {"inputs": text | [texts] | [[a, b]]} -> {"predictions": [{"label", ...}]}
- tei: TEI's /predict: {"inputs": text | [a, b] | [[text], [a, b], ...]} -> [{"label", "score"}, ...] per
  input (a batch: one list per input; the Hugging Face inference API's [[...]] for one input is read too)
- oip: Open Inference Protocol v2 /v2/models/{name}/infer: one BYTES tensor per text column (shape [n]);
  the answer's BYTES output holds the labels, or a numeric [n, k] output the per-class scores
- template: any JSON body with "{{text}}", "{{text_pair}}", "{{texts}}" placeholders; the labels are read
  with a small JSONPath subset (`$[0].label`, `outputs[0].data[*]`, `predictions[*].label`)
"""
from __future__ import annotations

import re

DEFAULT_PATHS = {"bertforge": "/predict", "tei": "/predict"}


class Malformed(ValueError):
    """The endpoint answered 200 with something that does not parse as this protocol's answer."""


# -- the protocols: a request body for n inputs, and the n labels read back from the answer ----------------

def _is_pair(x) -> bool:
    return not isinstance(x, str)


def _fill(node, inputs: list):
    """The template with its placeholders filled: "{{texts}}" is the list of inputs (a text, or [a, b]),
    "{{text}}" / "{{text_pair}}" the first input's parts, also inside longer strings."""
    if isinstance(node, dict):
        return {k: _fill(v, inputs) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, inputs) for v in node]
    if not isinstance(node, str):
        return node
    if node == "{{texts}}":
        return list(inputs)
    first = inputs[0]
    a, b = (first[0], first[1]) if _is_pair(first) else (first, "")
    if node == "{{text}}":
        return a
    if node == "{{text_pair}}":
        return b
    return node.replace("{{text}}", a).replace("{{text_pair}}", b)


_STEP = re.compile(r"\.([A-Za-z_][\w-]*)|\[(\d+|\*)\]|\[['\"]([^'\"]+)['\"]\]")


def parse_field(expr: str) -> list:
    """`$[0].label`, `outputs[0].data[*]`, `predictions[*].label`, `['my key']`: a small JSONPath subset
    (names, indices, one wildcard level per [*]). Steps are ("key", name), ("index", i) or ("all", None)."""
    text = expr.strip()
    text = text[1:] if text.startswith("$") else text
    if text and text[0] not in ".[":
        text = "." + text
    steps, pos = [], 0
    while pos < len(text):
        m = _STEP.match(text, pos)
        if not m:
            raise ValueError(f"label field {expr!r}: cannot read {text[pos:]!r} (use names, [n], [*], ['key'])")
        name, index, quoted = m.groups()
        if index == "*":
            steps.append(("all", None))
        elif index is not None:
            steps.append(("index", int(index)))
        else:
            steps.append(("key", name or quoted))
        pos = m.end()
    return steps


def extract(answer, steps: list) -> list:
    """Every value the path reaches, in order ([*] fans out)."""
    values = [answer]
    for kind, arg in steps:
        out = []
        for v in values:
            if kind == "key":
                if not isinstance(v, dict) or arg not in v:
                    raise Malformed(f"no key {arg!r}")
                out.append(v[arg])
            elif kind == "index":
                if not isinstance(v, list) or not -len(v) <= arg < len(v):
                    raise Malformed(f"no item [{arg}]")
                out.append(v[arg])
            else:
                if not isinstance(v, list):
                    raise Malformed("[*] on a non-list")
                out.extend(v)
        values = out
    return values


def _label(value):
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Malformed(f"label {value!r} is not a string or a class id")
    return value


def _best(scored) -> str:
    """The label of the highest score in a [{"label", "score"}, ...] list (TEI sorts it; do not rely on it)."""
    if not isinstance(scored, list) or not scored or not all(
            isinstance(s, dict) and isinstance(s.get("label"), str) and isinstance(s.get("score"), (int, float))
            for s in scored):
        raise Malformed("expected a list of {label, score}")
    return max(scored, key=lambda s: s["score"])["label"]


class Protocol:
    def __init__(self, spec: dict):
        self.name = spec.get("protocol", "bertforge")
        self.path = spec.get("path") or DEFAULT_PATHS.get(self.name)
        self.headers = dict(spec.get("headers") or {})
        self.template = spec.get("template")
        self.field_expr = spec.get("label_field")
        self.field = parse_field(self.field_expr) if self.field_expr else None
        self.inputs = spec.get("input_names") or ["text"]
        self.output = spec.get("output_name")
        self.labels = spec.get("labels")  # class names by id, for answers that give ids or scores

    def body(self, inputs: list):
        n = len(inputs)
        if self.name == "bertforge":
            return {"inputs": (inputs[0] if isinstance(inputs[0], str) else [inputs[0]]) if n == 1 else list(inputs)}
        if self.name == "tei":
            # TEI: a text, a pair [a, b], or a batch of [text] / [a, b] lists.
            # raw_scores (TEI's default, false) marks the body as TEI's where /predict is shared (bertforge).
            return {"inputs": inputs[0] if n == 1 else [x if _is_pair(x) else [x] for x in inputs], "raw_scores": False}
        if self.name == "oip":
            firsts = [x[0] if _is_pair(x) else x for x in inputs]
            tensors = [{"name": self.inputs[0], "shape": [n], "datatype": "BYTES", "data": firsts}]
            if _is_pair(inputs[0]):
                if len(self.inputs) < 2:
                    raise ValueError("text pairs over the Open Inference Protocol need a second input name")
                tensors.append({"name": self.inputs[1], "shape": [n], "datatype": "BYTES", "data": [x[1] for x in inputs]})
            return {"inputs": tensors}
        return _fill(self.template, inputs)

    def labels_of(self, answer, n: int) -> list:
        """The n predicted labels in the answer, or Malformed."""
        if self.name == "bertforge":
            preds = answer.get("predictions") if isinstance(answer, dict) else None
            if not isinstance(preds, list) or len(preds) != n or not all(isinstance(p, dict) for p in preds):
                raise Malformed(f'expected {{"predictions": [{n} objects]}}')
            if all(isinstance(p.get("value"), (int, float)) for p in preds):  # a regression model
                return [None] * n
            return [_label(p.get("label")) for p in preds]
        if self.name == "tei":
            # TEI answers one input with [{label, score}, ...], a batch with one such list per input; the
            # Hugging Face inference API wraps even a single input's list in another list.
            if not isinstance(answer, list) or not answer:
                raise Malformed("expected a list of {label, score}")
            per_input = answer if isinstance(answer[0], list) else [answer]
            if len(per_input) != n:
                raise Malformed(f"{len(per_input)} answers for {n} inputs")
            return [_best(s) for s in per_input]
        if self.name == "oip":
            return self._oip_labels(answer, n)
        values = extract(answer, self.field)
        if len(values) != n:
            raise Malformed(f"{self.field_expr} gave {len(values)} values for {n} inputs")
        return [_label(v) for v in values]

    def _oip_labels(self, answer, n: int) -> list:
        outputs = answer.get("outputs") if isinstance(answer, dict) else None
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, dict) for o in outputs):
            raise Malformed('expected {"outputs": [tensors]}')
        if self.output:
            chosen = [o for o in outputs if o.get("name") == self.output]
            if not chosen:
                raise Malformed(f"no output named {self.output!r}")
            out = chosen[0]
        else:  # labels as strings if the server gives them, else the first tensor
            out = next((o for o in outputs if o.get("datatype") == "BYTES"), outputs[0])
        data, shape = out.get("data"), out.get("shape")
        if not isinstance(data, list) or not isinstance(shape, list) or not shape or shape[0] != n:
            raise Malformed(f"output {out.get('name')!r}: expected shape [{n}, ...] and a data list")
        width = 1
        for d in shape[1:]:
            width *= d
        if len(data) != n * width:
            raise Malformed(f"output {out.get('name')!r}: {len(data)} values for shape {shape}")
        if width == 1:
            return [_label(v) for v in data]
        # Scores or logits per class, row-major: the answer is the best class.
        rows = [data[i * width:(i + 1) * width] for i in range(n)]
        if not all(isinstance(v, (int, float)) for r in rows for v in r):
            raise Malformed(f"output {out.get('name')!r}: non-numeric scores")
        best = [max(range(width), key=r.__getitem__) for r in rows]
        return [self.labels[b] if self.labels and b < len(self.labels) else b for b in best]
