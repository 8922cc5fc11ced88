"""Sampling from a causal (CLM) model, free or constrained to code for a given protein.

``generate`` decodes every row of a batch together (``num`` samples of each prompt; prompts of
different lengths are right-padded once, then every row advances in lockstep at its own positions),
from the model's cache (``Backbone.decode``: GPT-2's keys and values, Mamba's recurrent state,
Hyena's filter and input history), so a step costs one token's forward pass. ``use_cache=False``
recomputes the whole context for every token (the reference path; the only one for models without
cached decoding). Both give the same logits, hence the same greedy sequences. The context starts
with ``<cls>`` like every training row; once a row outgrows ``max_seq_len`` the model sees ``<cls>``
plus the most recent tokens, as it saw the random crops of long records in training, and from then
on every step recomputes that window (positions shift, so nothing can be cached).

Each step takes the logits at each row's last position over the real vocabulary, removes the tokens
that can never be generated (``<pad>``, ``<cls>``, ``<unk>``, ``<mask>``), ``<eos>`` before
``min_length`` new tokens and, under a protein constraint, every codon that does not code for the
next amino acid; then applies the temperature, top-k and top-p (nucleus) filters and draws from a
seeded ``torch.Generator``. A row ends at ``<eos>``, at a stop codon (a designed protein's last codon,
or any in-frame stop with ``stop_codon``), or at ``max_length`` new tokens. The reported
log-likelihood is the model's own (temperature 1, unfiltered, unconstrained) log-probability of the
generated tokens, so it measures how natural the model finds the sequence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from helm.data.dataset import frame
from helm.data.io import DataError, iter_records
from helm.lm import inference_autocast
from helm.vocab import (
    AMINO_ACIDS,
    CLS_ID,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    STOP,
    UNK_ID,
    codon_id,
    genetic_code,
    synonymous_codons,
)

NEVER_SAMPLED = (PAD_ID, CLS_ID, UNK_ID, MASK_ID)


@dataclass
class Sample:
    """One generated sequence: its token ids (prefix included, no frame), its log-likelihood, and
    how it ended: ``eos``, ``stop`` (a stop codon) or ``cap`` (it ran into the length cap)."""

    ids: list[int]
    num_generated: int
    log_likelihood: float
    end: str = "eos"

    @property
    def ended(self) -> bool:
        """Whether the sequence ended by itself (not at the length cap)."""
        return self.end != "cap"


def clean_protein(protein: str) -> str:
    """Upper-cased one-letter protein without whitespace or a trailing stop; validated."""
    seq = "".join(protein.split()).upper().rstrip(STOP)
    if not seq:
        raise ValueError("the protein is empty")
    bad = sorted(set(seq) - set(AMINO_ACIDS))
    if bad:
        raise ValueError(
            f"the protein holds {bad}, which are not among the 20 standard amino acids "
            f"{AMINO_ACIDS} (a stop '*' is allowed only at the end)"
        )
    return seq


def protein_masks(protein: str, vocab_size: int) -> torch.Tensor:
    """(L + 1, V) bool: row i allows the codons of amino acid i; the last row the stop codons.

    Built from the standard genetic code, so a sampled sequence translates back to `protein`
    followed by a stop (an initial M can only be ATG, its one codon).
    """
    protein = clean_protein(protein)
    groups = synonymous_codons()
    masks = torch.zeros(len(protein) + 1, vocab_size, dtype=torch.bool)
    for i, aa in enumerate(protein + STOP):
        masks[i, [codon_id(c) for c in groups[aa]]] = True
    return masks


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """(B, V) logits (-inf where forbidden) -> sampling log-weights after temperature, top-k, top-p.

    ``temperature == 0`` keeps only the argmax (greedy). Top-p keeps the smallest set of the most
    likely tokens whose probability reaches `top_p` (at least one token).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        best = logits.argmax(-1, keepdim=True)
        return torch.full_like(logits, -math.inf).scatter(-1, best, 0.0)
    logits = logits / temperature
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p: the first always stays.
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return logits


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Prompt],
    num: int = 1,
    *,
    vocab_size: int,
    max_length: int | None = None,
    min_length: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    use_cache: bool = True,
    stop_codon: bool = False,
) -> list[Sample]:
    """``num`` continuations of every prompt, in prompt order, decoded as one batch (module
    docstring), each at most ``max_length`` new tokens (default: what fills the model's window
    after the prompt). A prompt with ``allowed`` ((L, V) from ``protein_masks``) generates exactly
    its L codons, the last a stop codon."""
    if getattr(model.cfg, "bidirectional", False):
        raise ValueError("sampling needs a causal (CLM) model")
    device = torch.device(device)
    rows = [p for p in prompts for _ in range(num)]
    decoder = Decoder(model, rows, vocab_size, max_length, device, use_cache)
    steps = decoder.steps  # (R,) new tokens each row may make
    loglik = torch.zeros(len(rows), dtype=torch.float64, device=device)
    made = torch.zeros(len(rows), dtype=torch.long, device=device)  # new tokens, <eos> included
    ending = torch.zeros(len(rows), dtype=torch.long, device=device)  # 0 running, then ENDS index
    stops = torch.tensor([codon_id(c) for c in STOP_CODONS], device=device)
    was_training = model.training
    model.eval()
    hidden = decoder.prefill()
    for step in range(int(steps.max())):
        with inference_autocast(device):
            logits = model.lm_head(hidden)[:, :vocab_size].float()  # (R, V)
        logp = logits.log_softmax(-1)
        ok = decoder.allowed(step)  # (R, V)
        if step < min_length:
            ok[:, EOS_ID] = False
        weights = filter_logits(logits.masked_fill(~ok, -math.inf), temperature, top_k, top_p)
        nxt = torch.multinomial(weights.softmax(-1), 1, generator=generator)[:, 0]  # (R,)
        running = ending == 0
        loglik += torch.where(running, logp.gather(-1, nxt[:, None])[:, 0].double(), 0.0)
        made += running.long()
        is_stop = torch.isin(nxt, stops) & (decoder.protein | stop_codon)
        new_end = torch.where(nxt == EOS_ID, 1, torch.where(is_stop, 2, 0))
        new_end = torch.where((new_end == 0) & (made >= steps), 3, new_end)  # the cap
        ending = torch.where(running, new_end, ending)
        decoder.append(nxt)
        if bool((ending > 0).all()):
            break
        hidden = decoder.next_hidden(nxt)
    model.train(was_training)
    return decoder.samples(made, loglik, ending)


STOP_CODONS = tuple(c for c, aa in genetic_code().items() if aa == STOP)
ENDS = ("", "eos", "stop", "cap")  # the ending codes of ``generate``


class Decoder:
    """The rows of one ``generate`` call: their tokens so far, and the model's hidden state at
    each row's last token, from the cache or by recomputing the (windowed) context."""

    def __init__(self, model, rows: Sequence[Prompt], vocab_size: int, max_length: int | None,
                 device, use_cache: bool):  # fmt: skip
        self.model, self.rows, self.device = model, rows, device
        self.window = model.cfg.max_seq_len
        framed = [frame(list(p.ids), causal=True).tolist() for p in rows]  # <cls> + prompt
        self.prompt_lengths = [len(f) for f in framed]
        fill = [max(1, self.window - n) for n in self.prompt_lengths]  # the window, once framed
        self.steps = torch.tensor(
            [
                len(p.allowed) if p.allowed is not None else max_length or f
                for p, f in zip(rows, fill)
            ],
            device=device,
        )
        total = max(self.prompt_lengths) + int(self.steps.max())
        self.tokens = torch.full((len(rows), total), PAD_ID, dtype=torch.long, device=device)
        for r, ids in enumerate(framed):
            self.tokens[r, : len(ids)] = torch.tensor(ids)
        self.lengths = torch.tensor(self.prompt_lengths, device=device)  # (R,) tokens per row
        self.protein = torch.tensor([p.allowed is not None for p in rows], device=device)
        self.masks = self._masks(vocab_size, int(self.steps.max()))
        self.cache = None
        if use_cache:
            self.cache = model.allocate_cache(len(rows), min(total, self.window))

    def _masks(self, vocab_size: int, steps: int) -> torch.Tensor:
        """(R, steps, V): what each row may draw at each step (a protein's codons, else all but the
        tokens never sampled)."""
        base = torch.ones(vocab_size, dtype=torch.bool, device=self.device)
        base[list(NEVER_SAMPLED)] = False
        masks = base.expand(len(self.rows), steps, vocab_size).clone()
        for r, p in enumerate(self.rows):
            if p.allowed is not None:
                masks[r, : len(p.allowed)] &= p.allowed.to(self.device)
        return masks

    def allowed(self, step: int) -> torch.Tensor:
        return self.masks[:, step].clone()

    def append(self, nxt: torch.Tensor) -> None:
        self.tokens[torch.arange(len(self.rows), device=self.device), self.lengths] = nxt
        self.lengths += 1

    def prefill(self) -> torch.Tensor:
        """(R, D) hidden states at each prompt's last token."""
        if self.cache is None:
            return self._recompute()
        width = max(self.prompt_lengths)
        mask = torch.arange(width, device=self.device)[None] < self.lengths[:, None]
        padded = None if mask.all() else mask.long()
        with inference_autocast(self.device):
            hidden = self.model.decode(self.tokens[:, :width], self.cache, attention_mask=padded)
        return hidden[torch.arange(len(self.rows), device=self.device), self.lengths - 1]

    def next_hidden(self, nxt: torch.Tensor) -> torch.Tensor:
        """(R, D) hidden states at the token just appended."""
        if self.cache is not None and self.cache.end < self.window:
            with inference_autocast(self.device):
                return self.model.decode(nxt[:, None], self.cache)[:, 0]
        self.cache = None  # past the window the positions shift: recompute from here on
        return self._recompute()

    def _recompute(self) -> torch.Tensor:
        """The full forward pass over each row's context: ``<cls>`` and its last window - 1
        tokens once it outgrows the window."""
        seen = self.lengths.clamp(max=self.window)  # (R,)
        width = int(seen.max())
        j = torch.arange(width, device=self.device)[None]  # (1, W)
        shift = (self.lengths - self.window).clamp(min=0)[:, None]  # tokens dropped after <cls>
        index = torch.where(j == 0, 0, j + shift).clamp(max=self.tokens.shape[1] - 1)
        inputs = self.tokens.gather(1, index)
        mask = j < seen[:, None]
        with inference_autocast(self.device):
            hidden = self.model(inputs, attention_mask=None if mask.all() else mask.long())
        return hidden[torch.arange(len(self.rows), device=self.device), seen - 1]

    def samples(self, made: torch.Tensor, loglik: torch.Tensor, ending: torch.Tensor) -> list:
        out = []
        for r, p in enumerate(self.rows):
            start, n = self.prompt_lengths[r], int(made[r])
            new = self.tokens[r, start : start + n].tolist()
            end = ENDS[int(ending[r])] or "cap"
            if end == "eos":
                new = new[:-1]
            out.append(Sample(list(p.ids) + new, n, float(loglik[r]), end))
        return out


def sample(model: nn.Module, prefix_ids: list[int], num: int, **kwargs) -> list[Sample]:
    """``num`` continuations of one prompt (``generate``; ``allowed`` as a keyword)."""
    allowed = kwargs.pop("allowed", None)
    return generate(model, [Prompt("sample", list(prefix_ids), allowed)], num, **kwargs)


def gc_content(seq: str) -> float:
    """Fraction of G and C among the letters (nan for an empty sequence)."""
    return (seq.count("G") + seq.count("C")) / len(seq) if seq else math.nan


def read_proteins(value: str) -> list[tuple[str, str]]:
    """(name, protein) pairs from ``--protein``: a sequence, or a FASTA / one-per-line file."""
    path = Path(value)
    if not path.is_file():
        return [("protein", clean_protein(value))]
    fasta = path.read_text().lstrip().startswith(">")
    out = []
    # Raw records (validate=False): proteins are checked by clean_protein, not as nucleotides.
    for record in iter_records(path, file_extension="fasta" if fasta else "txt", validate=False):
        name = (record.header or f"protein{record.index}") if fasta else f"line{record.line}"
        try:
            out.append((name, clean_protein(record.sequence)))
        except ValueError as exc:
            raise DataError(f"{path}: {name}: {exc}") from None
    if not out:
        raise DataError(f"{path}: no protein sequences")
    return out


def fasta_record(index: int, sample: Sample, sequence: str, source: str, nucleotides: bool) -> str:
    """``>gen{index} source=... tokens=... [gc=... cai=...] loglik=... end=eos|stop|cap`` and the
    sequence in lines of 80; ``end=cap``: no end within the length cap."""
    from helm.codon_usage import cai

    fields = [f"source={source}", f"tokens={sample.num_generated}"]
    if nucleotides:
        fields += [f"gc={gc_content(sequence):.4f}", f"cai={cai(sequence):.4f}"]
    fields += [f"loglik={sample.log_likelihood:.4f}", f"end={sample.end}"]
    lines = [f">gen{index} " + " ".join(fields)]
    lines += [sequence[i : i + 80] for i in range(0, len(sequence), 80)] or [""]
    return "\n".join(lines)


@dataclass
class Prompt:
    """What one group of samples continues: token ids (no frame) and, for a designed protein, the
    allowed tokens of each step (``protein_masks``)."""

    name: str
    ids: list[int]
    allowed: torch.Tensor | None = None


def build_prompts(
    tokenizer, *, protein: str | None = None, prefixes: Sequence[tuple[str, str]] = ()
) -> list[Prompt]:
    """The prompts of a protein (a sequence or a file of them, ``read_proteins``: codon tokenizer
    only) or of ``(name, nucleotide prefix)`` pairs (whole codons for a codon tokenizer)."""
    if protein is not None:
        if not tokenizer.is_codon:
            raise ValueError(
                f"--protein needs the codon tokenizer (3mer, overlap 0); this model uses "
                f"{tokenizer.name}: sample without --protein"
            )
        return [
            Prompt(name, [], protein_masks(seq, tokenizer.vocab_size))
            for name, seq in read_proteins(protein)
        ]
    prompts = []
    for name, prefix in prefixes:
        prefix = "".join(prefix.split()).upper().replace("U", "T")
        if tokenizer.is_codon and len(prefix) % 3:
            raise ValueError(f"prefix {name!r}: length {len(prefix)} is not whole codons")
        prompts.append(Prompt(name, [int(i) for i in tokenizer.encode(prefix)]))
    return prompts
