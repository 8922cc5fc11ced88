"""Sampling from a causal (CLM) model, free or constrained to code for a given protein.

Decoding is plain autoregressive sampling: every step runs the full forward pass over the context
again (no key/value cache). For the model sizes HELM trains (tens of millions of parameters, a few
hundred to a thousand codons) this costs seconds, and it works unchanged for every backbone
(attention, Mamba, Hyena). The context starts with ``<cls>`` like every training row; once it
outgrows ``max_seq_len`` the model sees ``<cls>`` plus the most recent tokens, as it saw the random
crops of long records in training.

Each step takes the logits at the last position over the real vocabulary, removes the tokens that
can never be generated (``<pad>``, ``<cls>``, ``<unk>``, ``<mask>``) and, under a protein
constraint, every codon that does not code for the next amino acid; then applies the temperature,
top-k and top-p (nucleus) filters and draws from a seeded ``torch.Generator``. The reported
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
    synonymous_codons,
)

NEVER_SAMPLED = (PAD_ID, CLS_ID, UNK_ID, MASK_ID)


@dataclass
class Sample:
    """One generated sequence: its token ids (prefix included, no frame), its log-likelihood, and
    whether it ended by sampling ``<eos>`` (False: it ran into the length cap)."""

    ids: list[int]
    num_generated: int
    log_likelihood: float
    ended: bool = True


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
def sample(
    model: nn.Module,
    prefix_ids: list[int],
    num: int,
    *,
    vocab_size: int,
    max_length: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    allowed: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> list[Sample]:
    """Draw `num` continuations of `prefix_ids` (token ids, no frame) from a causal backbone.

    Generation stops at ``<eos>`` or after `max_length` new tokens. With `allowed` ((L, V) bool,
    from `protein_masks`) step i may only produce tokens allowed in row i and exactly L tokens are
    generated (``<eos>`` is then never drawn; the frame ends after the stop codon).
    """
    if getattr(model.cfg, "bidirectional", False):
        raise ValueError("sampling needs a causal (CLM) model")
    device = torch.device(device)
    steps = len(allowed) if allowed is not None else max_length
    window = model.cfg.max_seq_len
    base = torch.ones(vocab_size, dtype=torch.bool, device=device)
    base[list(NEVER_SAMPLED)] = False
    if allowed is not None:
        allowed = allowed.to(device)
    ctx = torch.from_numpy(frame(prefix_ids, causal=True)).to(device).repeat(num, 1)  # (B, T)
    loglik = torch.zeros(num, dtype=torch.float64, device=device)
    done = torch.zeros(num, dtype=torch.bool, device=device)
    lengths = torch.full((num,), steps, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    for step in range(steps):
        inp = ctx if ctx.shape[1] <= window else torch.cat([ctx[:, :1], ctx[:, -window + 1 :]], 1)
        with inference_autocast(device):
            hidden = model(inp)[:, -1]  # (B, D)
            logits = model.lm_head(hidden)[:, :vocab_size].float()  # (B, V)
        logp = logits.log_softmax(-1)
        ok = base if allowed is None else base & allowed[step]
        weights = filter_logits(logits.masked_fill(~ok, -math.inf), temperature, top_k, top_p)
        nxt = torch.multinomial(weights.softmax(-1), 1, generator=generator)  # (B, 1)
        loglik += torch.where(done, 0.0, logp.gather(-1, nxt)[:, 0].double())
        ended = (nxt[:, 0] == EOS_ID) & ~done
        lengths = torch.where(ended, step + 1, lengths)
        done |= ended
        ctx = torch.cat([ctx, nxt], 1)
        if bool(done.all()):
            break
    model.train(was_training)
    start = 1 + len(prefix_ids)
    out = []
    for b in range(num):
        new = ctx[b, start : start + int(lengths[b])].tolist()
        if new and new[-1] == EOS_ID:
            new = new[:-1]
        sample = Sample(list(prefix_ids) + new, int(lengths[b]), float(loglik[b]), bool(done[b]))
        out.append(sample)
    return out


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
    """``>gen{index} source=... tokens=... [gc=... cai=...] loglik=... end=eos|cap`` and the
    sequence in lines of 80; ``end=cap``: no <eos> within the length cap."""
    from helm.codon_usage import cai

    fields = [f"source={source}", f"tokens={sample.num_generated}"]
    if nucleotides:
        fields += [f"gc={gc_content(sequence):.4f}", f"cai={cai(sequence):.4f}"]
    fields += [f"loglik={sample.log_likelihood:.4f}", "end=eos" if sample.ended else "end=cap"]
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
