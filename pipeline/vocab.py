"""Stage: vocabulary trimming. Keep the word pieces a task's training rows use, drop the rest of the
embedding matrix.

The word embeddings are most of a small student (30,522 x 384 of a 3-layer, 384-wide model's 17.4M
parameters), and a task's training text uses a fraction of them. Kept are:
  - the special tokens ([PAD], [UNK], [CLS], [SEP], [MASK]);
  - every piece the training rows tokenize to;
  - with `characters`, every printable ASCII character and its `##` continuation, so an unseen English
    word is still spelled out in pieces rather than becoming [UNK];
  - a `reserve` of further pieces, taken as the most frequent ones. Frequency is not measured: BERT's
    WordPiece vocab.txt lists whole pieces by corpus frequency after its block of single characters, so the
    reserve is the lowest-id multi-character pieces not kept yet ([unusedN] placeholders skipped).
Kept pieces keep their relative order, so ids are remapped monotonically; the tokenizer is rewritten as a
plain vocab.txt (and its tokenizer.json rebuilt from it), the embedding rows (and any output layer tied to
them) are sliced, and `config.vocab_size` / `pad_token_id` follow. The folder loads with the standard
`AutoTokenizer.from_pretrained` and `AutoModelForSequenceClassification.from_pretrained`, and on text whose
pieces were all kept gives exactly the untrimmed model's logits.

A dev piece is "lost" when the untrimmed tokenizer knew it and the trimmed one maps its word to [UNK]
(WordPiece turns a whole word into [UNK] when it cannot spell it); the manifest reports that share.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from pipeline import modeling_pruned_bert
from pipeline.artifacts import Manifest, prepare_output_dir, read_manifest, write_manifest
from pipeline.data import GLUE_DIR_HELP, GLUE_TASKS, Example, dev_split, get_task, load_glue, load_train_examples
from pipeline.errors import BertforgeError
from pipeline.models import count_parameters, load_model, load_tokenizer, resolve_model
from pipeline.settings import setting

PLACEHOLDER = re.compile(r"\[unused\d+\]")
ASCII_PRINTABLE = [chr(c) for c in range(33, 127)]


@dataclass
class VocabConfig:
    model: str = setting(help="PyTorch classifier artifact folder (pruned or not)")
    task: str = setting(help=f"GLUE task whose training rows decide the vocabulary: {', '.join(GLUE_TASKS)}")
    out: str = setting(help="the trimmed model's folder")
    glue_dir: str | None = setting(None, GLUE_DIR_HELP, env="GLUE_DIR")
    train_file: str | None = setting(None, "TSV in the task's layout whose pieces are kept (default: the GLUE train split)")
    max_train_examples: int | None = setting(None, "use the first N training rows only")
    reserve: int = setting(1000, "keep this many more pieces beyond those the training rows use (the lowest-id "
                                 "multi-character pieces: BERT's vocab lists them by frequency)")
    characters: bool = setting(True, "keep every printable ASCII character and its ## form, so unseen English "
                                     "words are spelled in pieces instead of becoming [UNK]", flag="--no-characters")


def trim_vocab(model_dir: str | os.PathLike, out_dir: str | os.PathLike, examples: Sequence[Example],
               reserve: int = 1000, characters: bool = True, dev: Sequence[Example] | None = None,
               task: str | None = None) -> Manifest:
    """Write a copy of `model_dir` into `out_dir` whose vocabulary is the pieces of `examples` plus the
    special tokens, the ASCII characters (`characters`) and `reserve` more; with `dev`, the manifest's
    `metrics.dev_tokens` reports the share of dev pieces lost to [UNK]."""
    start = time.perf_counter()
    if reserve < 0:
        raise BertforgeError(f"reserve must be >= 0, got {reserve}")
    if not examples:
        raise BertforgeError("vocabulary trimming needs training rows: none given")
    parent = read_manifest(model_dir)
    if parent and parent.format != "pytorch":
        raise BertforgeError(f"{model_dir} is an ONNX artifact: trim the PyTorch model, then export")
    tokenizer = load_tokenizer(model_dir)
    _require_wordpiece(tokenizer, model_dir)
    model = load_model(model_dir)
    vocab = tokenizer.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    if [vocab[p] for p in pieces] != list(range(len(pieces))):
        raise BertforgeError(f"{model_dir}: the tokenizer's ids are not 0..{len(pieces) - 1}; cannot remap them")
    if model.get_input_embeddings().num_embeddings != len(pieces):
        raise BertforgeError(f"{model_dir}: {model.get_input_embeddings().num_embeddings} embedding rows for a "
                             f"{len(pieces)}-piece vocabulary; cannot trim")

    special = set(tokenizer.all_special_ids)
    seen = _piece_ids(tokenizer, examples)
    chars = {vocab[p] for c in ASCII_PRINTABLE for p in (c, "##" + c) if p in vocab} if characters else set()
    keep = special | seen | chars
    candidates = [i for i, p in enumerate(pieces) if i not in keep and not PLACEHOLDER.fullmatch(p)]
    candidates.sort(key=lambda i: (len(pieces[i].removeprefix("##")) == 1, i))  # single characters last
    extra = set(candidates[:reserve])
    kept = sorted(keep | extra)

    out = prepare_output_dir(out_dir)
    new_tokenizer = _write_tokenizer(tokenizer, [pieces[i] for i in kept], out)
    _slice_embeddings(model, kept, new_tokenizer.pad_token_id)
    model.save_pretrained(out)
    if getattr(model.config, "auto_map", None):  # a pruned model with per-layer FFN widths: its class travels along
        shutil.copy(modeling_pruned_bert.__file__, out / Path(modeling_pruned_bert.__file__).name)

    before_bytes = _weights_bytes(model_dir)
    params = {"reserve": reserve, "characters": characters, "train_rows": len(examples),
              "vocab_before": len(pieces), "vocab_after": len(kept),
              "kept": {"special": len(special), "seen_in_training": len(seen), "characters": len(chars - seen - special),
                       "reserve": len(extra)},
              "params_before": count_parameters(model) + (len(pieces) - len(kept)) * model.config.hidden_size,
              "weights_bytes_before": before_bytes, "weights_bytes_after": (out / "model.safetensors").stat().st_size}
    metrics = {"dev_tokens": lost_to_unk(tokenizer, new_tokenizer, dev)} if dev else {}
    return write_manifest(out, Manifest(stage="vocab", task=task, parent=str(model_dir), params=params,
                                        metrics=metrics, num_parameters=count_parameters(model),
                                        wall_s=round(time.perf_counter() - start, 1)))


def trim_vocab_for_task(cfg: VocabConfig) -> Manifest:
    """`trim_vocab` on the task's training rows (or `train_file`), reporting on its dev split."""
    task = get_task(cfg.task)
    train = load_train_examples(task.name, cfg.glue_dir, cfg.train_file, cfg.max_train_examples)
    dev = load_glue(task.name, dev_split(task), cfg.glue_dir)
    m = trim_vocab(cfg.model, cfg.out, train, cfg.reserve, cfg.characters, dev, task.name)
    m.params["config"] = asdict(cfg)
    return write_manifest(cfg.out, m)


def lost_to_unk(before, after, examples: Sequence[Example]) -> dict:
    """How the trimmed tokenizer `after` treats `examples` against the untrimmed `before`, word by word:
    `lost_share` is the share of the untrimmed pieces that were known and whose word now maps to [UNK];
    `changed_share` the share of words spelled in other pieces (not [UNK])."""
    backend = before.backend_tokenizer
    pieces = lost = changed = words_total = unk_before = unk_after = pieces_after = 0
    for text in (t for ex in examples for t in (ex.text_a, ex.text_b) if t):
        words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]
        if not words:
            continue
        old = _pieces_per_word(before, words)
        new = _pieces_per_word(after, words)
        for o, n in zip(old, new):
            words_total += 1
            pieces += len(o)
            pieces_after += len(n)
            unk_before += o.count(before.unk_token)
            unk_after += n.count(after.unk_token)
            if n == [after.unk_token] and o != [before.unk_token]:
                lost += sum(p != before.unk_token for p in o)
            elif n != o:
                changed += 1
    share = lambda a, b: round(a / b, 6) if b else 0.0  # noqa: E731
    return {"texts": sum(bool(t) for ex in examples for t in (ex.text_a, ex.text_b)), "words": words_total,
            "pieces": pieces, "lost_to_unk": lost, "lost_share": share(lost, pieces),
            "changed_words": changed, "changed_share": share(changed, words_total),
            "unk_share_before": share(unk_before, pieces), "unk_share_after": share(unk_after, pieces_after)}


# -- pieces ----------------------------------------------------------------------------------------

def _require_wordpiece(tokenizer, source) -> None:
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if not tokenizer.is_fast or type(model).__name__ != "WordPiece" or "vocab_file" not in tokenizer.vocab_files_names:
        raise BertforgeError(f"vocabulary trimming supports WordPiece (BERT) tokenizers with a vocab.txt; "
                             f"{source} has {type(tokenizer).__name__}")


def _piece_ids(tokenizer, examples: Sequence[Example], chunk: int = 4096) -> set[int]:
    texts = [t for ex in examples for t in (ex.text_a, ex.text_b) if t]
    seen: set[int] = set()
    for i in range(0, len(texts), chunk):
        for ids in tokenizer(texts[i:i + chunk], add_special_tokens=False)["input_ids"]:
            seen.update(ids)
    return seen


def _pieces_per_word(tokenizer, words: list[str]) -> list[list[str]]:
    enc = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
    out: list[list[str]] = [[] for _ in words]
    for piece, w in zip(enc.tokens(), enc.word_ids()):
        out[w].append(piece)
    return out


def _write_tokenizer(tokenizer, kept_pieces: list[str], out: Path):
    """Save `tokenizer` with the vocabulary `kept_pieces` (new id = position); returns it reloaded the
    standard way from `out`."""
    tokenizer.save_pretrained(out)
    (out / "vocab.txt").write_text("".join(p + "\n" for p in kept_pieces), encoding="utf-8")
    (out / "tokenizer.json").unlink(missing_ok=True)  # rebuilt from vocab.txt below
    new_id = {p: i for i, p in enumerate(kept_pieces)}
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # the special tokens are recorded by id: renumber them
    cfg["added_tokens_decoder"] = {str(new_id[t["content"]]): t for t in cfg.get("added_tokens_decoder", {}).values()
                                   if t["content"] in new_id}
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    new = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    new.save_pretrained(out)
    new = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    if new.get_vocab() != new_id:
        raise BertforgeError("the rewritten tokenizer does not have the trimmed vocabulary (unexpected tokenizer layout)")
    return new


def _slice_embeddings(model, kept: list[int], pad_id: int | None) -> None:
    index = torch.tensor(kept, dtype=torch.long)
    old = model.get_input_embeddings()
    new = torch.nn.Embedding(len(kept), old.embedding_dim, padding_idx=pad_id)
    with torch.no_grad():
        new.weight.copy_(old.weight[index])
    model.set_input_embeddings(new)
    head = model.get_output_embeddings()  # none on a classifier; a masked-LM head's rows follow the vocabulary
    if head is not None:
        head.weight = torch.nn.Parameter(head.weight.detach()[index].clone())
        if getattr(head, "bias", None) is not None:
            head.bias = torch.nn.Parameter(head.bias.detach()[index].clone())
        head.out_features = len(kept)
    model.config.vocab_size = len(kept)
    model.config.pad_token_id = pad_id
    if head is not None and getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def _weights_bytes(model_dir) -> int | None:
    path = Path(resolve_model(model_dir)) / "model.safetensors"
    return path.stat().st_size if path.is_file() else None
