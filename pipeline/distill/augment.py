"""TinyBERT's data augmentation, batched.

For every word of an example (BERT's basic tokenizer: whitespace and punctuation split), a list of up
to K replacement candidates is made once:
- a word that is one word-piece: the top-K predictions of a masked language model with that word
  masked in its own sentence;
- a word of several pieces (or unknown to the masked LM): its K nearest GloVe neighbours by cosine.
Stopwords and non-alphabetic words get none. Then N variants are drawn: in each, every word with
candidates is replaced by a random one of them with probability p. Duplicates are dropped, the label
is kept, and the original example is written first (as the official script does).

Speed. The official script runs one masked-LM forward per word, batch size 1. Here every candidate
word gets its own copy of its sentence with only that word masked, and many such copies, from many
sentences, run in one forward (sorted by length so little padding is computed); the vocabulary head is
applied only at the masked positions. One copy per word, rather than one copy per sentence with all
selected words masked, keeps each prediction conditioned on the full unmasked context, exactly as the
paper's per-word procedure: the batched augmenter gives the same candidates as a batch-1 loop, only
faster, and the candidates of a word serve all N variants.

Differences from the official script, on purpose: the masked LM sees the masked sentence alone (the
official one appends the unmasked sentence as segment B, which lets the model read the answer), and the
word itself, sub-word pieces and non-words are never candidates. Sentence pairs: variants of sentence A
are paired with the original sentence B and variants of B with the original A (the official script
pairs B's variants with the last variant of A). Every example has its own random stream (seed, row,
side), so the output depends only on the seed, not on batch sizes or chunking.

Without a masked LM (none can be had offline here), every candidate word takes GloVe neighbours; the
manifest written beside the output says which source was used.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.data import GLUE_DIR_HELP, GLUE_TASKS, Example, get_task, load_examples_file, load_glue, write_examples_file
from pipeline.distill.glove import GloveVectors, load_glove
from pipeline.errors import BertforgeError
from pipeline.settings import setting

# NLTK's English stopword list, which the official TinyBERT script also uses (NLTK is not a dependency).
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him
his himself she she's her hers herself it it's its itself they them their theirs themselves what which who
whom this that that'll these those am is are was were be been being have has had having do does did doing
a an the and but if or because as until while of at by for with about against between into through during
before after above below to from up down in out on off over under again further then once here there when
where why how all any both each few more most other some such no nor not only own same so than too very s t
can will just don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't
doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't
shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
""".split())


@dataclass
class AugmentConfig:
    task: str = setting(help=f"GLUE task: {', '.join(GLUE_TASKS)}")
    out: str = setting(help="the augmented TSV; its manifest goes to OUT.json")
    glue_dir: str | None = setting(None, GLUE_DIR_HELP, env="GLUE_DIR")
    input_file: str | None = setting(None, "TSV in the task's layout instead of GLUE train")
    mlm: str | None = setting(None, "masked LM (hub id or folder) for single-piece words; none: GloVe candidates "
                                    "for every word")
    # Or fit a masked-LM head on this frozen BERT encoder over the input's own text, and use that
    # (pipeline/distill/mlm_head.py); the head is kept beside the output as OUT.mlm/.
    mlm_head_on: str | None = setting(None, "no masked LM at hand: fit a masked-LM head on this frozen BERT encoder "
                                            "over the task's text", metavar="ENCODER")
    mlm_head_steps: int = setting(600, "training steps of that head")
    glove: str | None = setting(None, "GloVe text file (default: packaged glove.6B 50-d)")
    p: float = setting(0.4, "probability of replacing a candidate word")
    k: int = setting(15, "candidates per word")
    n: int = setting(20, "variants drawn per example (per side of a pair)")
    seed: int = setting(0, "seed of the replacement draws")
    batch_size: int = setting(256, "masked sentence copies per masked-LM forward")
    max_length: int = setting(128, "word-pieces the masked LM sees; later words get GloVe candidates")
    max_examples: int | None = setting(None, "augment the first N examples only")
    chunk_size: int = setting(2000, "examples augmented (and written) at a time")
    device: str | None = setting(None, "cpu | cuda (default: cuda when available)")
    num_threads: int | None = setting(None, "CPU threads for torch", flag="--threads")


def is_candidate_word(word: str) -> bool:
    return word.isalpha() and word.lower() not in STOPWORDS


class Augmenter:
    """Candidate lists for words in context, and the random variants drawn from them."""

    def __init__(self, glove: GloveVectors, mlm: str | None = None, p: float = 0.4, k: int = 15, n: int = 20,
                 seed: int = 0, batch_size: int = 256, max_length: int = 128, device: str | None = None):
        from transformers.models.bert.tokenization_bert import BasicTokenizer

        if not 0.0 <= p <= 1.0 or k < 1 or n < 0 or batch_size < 1:
            raise BertforgeError("augmentation needs 0 <= p <= 1, k >= 1, n >= 0 and batch size >= 1")
        self.glove, self.p, self.k, self.n, self.seed = glove, p, k, n, seed
        self.batch_size, self.max_length = batch_size, max_length
        # Case is kept so that untouched words come back as they were.
        self.words_of = BasicTokenizer(do_lower_case=False, strip_accents=False).tokenize
        self.mlm_name = mlm
        self.model = self.tokenizer = None
        if mlm is not None:
            self._load_mlm(mlm, device)
        self.forwards = 0  # masked-LM forward passes run (for the speed report)

    @property
    def sources(self) -> dict[str, str]:
        glove = f"glove:{self.glove.source}"
        return {"single_piece": f"masked-lm:{self.mlm_name}" if self.model is not None else glove,
                "multi_piece": glove}

    def _load_mlm(self, name: str, device: str | None) -> None:
        from transformers import AutoModelForMaskedLM

        from pipeline.models import load_tokenizer, resolve_model

        path = resolve_model(name)
        try:
            self.model = AutoModelForMaskedLM.from_pretrained(path).eval()
        except (OSError, ValueError) as e:
            raise BertforgeError(f"cannot load a masked language model from {name}: {str(e).splitlines()[0]}") from None
        self.tokenizer = load_tokenizer(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        tok = self.tokenizer
        if tok.mask_token_id is None:
            raise BertforgeError(f"{name}'s tokenizer has no mask token: not a masked language model")
        vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
        special = set(tok.all_special_ids)
        # Whole alphabetic words only: no sub-word pieces, punctuation, [unusedN] or special tokens, and no
        # stopwords (a weak masked LM ranks "the", "he", "to" first anywhere; a replacement by one rarely
        # keeps the label; the official script allows them).
        allowed = torch.tensor([is_candidate_word(t) and i not in special for i, t in enumerate(vocab)])
        size = self.model.get_output_embeddings().weight.shape[0]
        bias = torch.full((size,), float("-inf"))
        bias[:len(allowed)][allowed[:size]] = 0.0
        self.vocab, self.vocab_bias = vocab, bias.to(self.device)
        self._pieces: dict[str, list[int]] = {}

    # -- candidates --------------------------------------------------------------------------
    def candidates(self, texts: list[str]) -> tuple[list[list[str]], list[list[list[str] | None]]]:
        """Words of each text and, per word, its candidates (None: left alone)."""
        words = [self.words_of(t) for t in texts]
        cands: list[list[list[str] | None]] = [[None] * len(ws) for ws in words]
        glove_wanted: list[tuple[int, int]] = []
        jobs = []  # (text, word, position) for masked-LM candidates
        seqs: list[list[int]] = []
        for t, ws in enumerate(words):
            if self.model is None:
                glove_wanted += [(t, i) for i, w in enumerate(ws) if is_candidate_word(w)]
                continue
            ids, pos = self._encode(ws)
            seqs.append(ids)
            for i, w in enumerate(ws):
                if not is_candidate_word(w):
                    continue
                if pos[i] is not None:
                    jobs.append((t, i, pos[i]))
                else:
                    glove_wanted.append((t, i))
        if jobs:
            self._mlm_candidates(jobs, seqs, words, cands)
        neighbours = self.glove.neighbours([words[t][i].lower() for t, i in glove_wanted], self.k)
        for t, i in glove_wanted:
            found = neighbours.get(words[t][i].lower())
            if found:
                cands[t][i] = found
        return words, cands

    def _encode(self, words: list[str]) -> tuple[list[int], list[int | None]]:
        """Word-piece ids of a sentence with [CLS]/[SEP], and each single-piece word's position in it."""
        tok = self.tokenizer
        ids, positions = [tok.cls_token_id], []
        for w in words:
            pieces = self._pieces.get(w)
            if pieces is None:
                pieces = self._pieces[w] = tok.convert_tokens_to_ids(tok.tokenize(w))
            single = len(pieces) == 1 and pieces[0] != tok.unk_token_id
            fits = len(ids) + len(pieces) < self.max_length
            positions.append(len(ids) if single and fits else None)
            ids += pieces
        ids = ids[:self.max_length - 1] + [tok.sep_token_id]
        return ids, positions

    @torch.no_grad()
    def _mlm_candidates(self, jobs, seqs, words, cands) -> None:
        jobs = sorted(jobs, key=lambda j: len(seqs[j[0]]))  # similar lengths share a batch: little padding
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(jobs), self.batch_size):
            part = jobs[start:start + self.batch_size]
            width = max(len(seqs[t]) for t, _, _ in part)
            ids = torch.full((len(part), width), pad, dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            original = torch.empty(len(part), dtype=torch.long)
            positions = torch.tensor([p for _, _, p in part])
            for row, (t, _, p) in enumerate(part):
                ids[row, :len(seqs[t])] = torch.tensor(seqs[t])
                mask[row, :len(seqs[t])] = 1
                original[row] = ids[row, p]
                ids[row, p] = self.tokenizer.mask_token_id
            logits = self._masked_logits(ids.to(self.device), mask.to(self.device), positions.to(self.device))
            self.forwards += 1
            logits = logits.float() + self.vocab_bias
            logits[torch.arange(len(part)), original.to(self.device)] = float("-inf")  # never the word itself
            top = logits.topk(self.k, dim=-1)
            for row, (t, i, _) in enumerate(part):
                found = [self.vocab[j] for j, v in zip(top.indices[row].tolist(), top.values[row].tolist()) if v > float("-inf")]
                cands[t][i] = found or None

    def _masked_logits(self, ids, mask, positions) -> torch.Tensor:
        """Vocabulary logits at one position per row. For BERT the head runs only at those positions
        (the vocabulary projection is most of a small model's cost); other masked LMs run whole."""
        rows = torch.arange(len(ids), device=ids.device)
        model = self.model
        if hasattr(model, "bert") and hasattr(model, "cls"):
            hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            return model.cls(hidden[rows, positions])
        return model(input_ids=ids, attention_mask=mask).logits[rows, positions]

    # -- variants ----------------------------------------------------------------------------
    def variants(self, words: list[str], cands: list[list[str] | None], rng: np.random.Generator) -> list[str]:
        """Up to N distinct variants of one sentence (the original excluded)."""
        slots = [i for i, c in enumerate(cands) if c]
        original = " ".join(words)
        seen, out = {original}, []
        for _ in range(self.n):
            new = list(words)
            for i in slots:
                pick = rng.integers(len(cands[i]))  # drawn for every slot, so streams stay aligned
                if rng.random() < self.p:
                    new[i] = _match_case(cands[i][pick], words[i])
            text = " ".join(new)
            if text not in seen:
                seen.add(text)
                out.append(text)
        return out

    def augment(self, examples: list[Example], first_index: int = 0) -> list[Example]:
        """Each example followed by its variants; `first_index` is the row number of examples[0] in the
        whole input, which seeds each example's random stream."""
        pair = bool(examples) and examples[0].text_b is not None
        texts = [ex.text_a for ex in examples] + ([ex.text_b or "" for ex in examples] if pair else [])
        words, cands = self.candidates(texts)
        out = []
        for j, ex in enumerate(examples):
            row = first_index + j
            out.append(ex)
            rng = np.random.default_rng([self.seed, row, 0])
            out += [Example(v, ex.text_b, ex.label) for v in self.variants(words[j], cands[j], rng)]
            if pair:
                b = len(examples) + j
                rng = np.random.default_rng([self.seed, row, 1])
                out += [Example(ex.text_a, v, ex.label) for v in self.variants(words[b], cands[b], rng)]
        return out


def _match_case(candidate: str, word: str) -> str:
    if word.isupper() and len(word) > 1:
        return candidate.upper()
    if word[:1].isupper():
        return candidate[:1].upper() + candidate[1:]
    return candidate


def manifest_path(out: str | os.PathLike) -> Path:
    return Path(str(out) + ".json")


def augment_dataset(cfg: AugmentConfig, progress: bool = True) -> dict:
    """Augment a task's training set into `cfg.out` (task layout) and write `cfg.out`.json; returns the latter."""
    start = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    task = get_task(cfg.task)
    examples = load_examples_file(task.name, cfg.input_file) if cfg.input_file else load_glue(task.name, "train", cfg.glue_dir)
    if cfg.max_examples:
        examples = examples[:cfg.max_examples]
    if any(ex.label is None for ex in examples):
        raise BertforgeError("the input has unlabeled rows: augmentation keeps labels, it needs them")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    mlm, head = cfg.mlm, None
    if cfg.mlm_head_on:
        if cfg.mlm:
            raise BertforgeError("give a masked LM (mlm) or an encoder to fit a head on (mlm_head_on), not both")
        from pipeline.distill.mlm_head import MANIFEST, MlmHeadConfig, fit_mlm_head

        texts = [ex.text_a for ex in examples] + [ex.text_b for ex in examples if ex.text_b]
        head_cfg = MlmHeadConfig(encoder=cfg.mlm_head_on, out=str(out) + ".mlm", steps=cfg.mlm_head_steps,
                                 seed=cfg.seed)
        mlm = str(fit_mlm_head(head_cfg, texts, progress))
        head = json.loads((Path(mlm) / MANIFEST).read_text())
    augmenter = Augmenter(load_glove(cfg.glove), mlm, cfg.p, cfg.k, cfg.n, cfg.seed, cfg.batch_size,
                          cfg.max_length, cfg.device)
    tmp = out.with_name(out.name + ".part")
    written = 0
    with open(out.with_name(out.name + ".tmp"), "w", encoding="utf-8", newline="") as dst, \
            tqdm(total=len(examples), desc=f"augment {task.name}", disable=not progress, unit="ex") as bar:
        for first in range(0, len(examples), cfg.chunk_size):
            rows = augmenter.augment(examples[first:first + cfg.chunk_size], first)
            write_examples_file(task.name, rows, tmp)
            lines = tmp.read_text(encoding="utf-8").splitlines(keepends=True)
            if first > 0 and task.train.header:
                lines = lines[1:]  # one header for the whole file
            dst.writelines(lines)
            written += len(rows)
            bar.update(min(cfg.chunk_size, len(examples) - first))
    tmp.unlink(missing_ok=True)
    out.with_name(out.name + ".tmp").replace(out)
    wall = time.perf_counter() - start

    from pipeline.artifacts import package_versions

    manifest = {
        "stage": "augment", "task": task.name, "file": out.name,
        "input": cfg.input_file or f"GLUE {task.name} train ({cfg.glue_dir or 'hub'})",
        "candidates": augmenter.sources,
        "fallback": None if mlm else "no masked LM given: GloVe neighbours for every word",
        "mlm_head": head and {k: head[k] for k in ("encoder", "texts", "first_loss", "last_loss", "wall_s")},
        "params": {k: v for k, v in asdict(cfg).items() if k not in ("out", "device", "num_threads")},
        "examples_in": len(examples), "examples_out": written, "mlm_forwards": augmenter.forwards,
        "wall_s": round(wall, 2), "examples_per_s": round(len(examples) / wall, 2) if wall else None,
        "versions": package_versions(),
    }
    manifest_path(out).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
