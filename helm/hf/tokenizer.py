"""Tokenizers between HELM and Hugging Face: a ``PreTrainedTokenizerFast`` with HELM's ids and
framing for an export, and HELM's k-mer tokenizer of an imported folder (codon or nucleotide
vocabulary in HELM's order, anything else refused)."""

from __future__ import annotations

import logging
from pathlib import Path

from helm.hf.common import import_refusal, require
from helm.vocab import NUM_SPECIAL, SPECIAL_TOKENS

log = logging.getLogger("helm")


def hf_tokenizer(tokenizer, causal: bool, max_length: int):
    """A ``transformers.PreTrainedTokenizerFast`` with the HELM tokenizer's ids and framing.

    k-mers without overlap split the raw sequence (a trailing partial k-mer dropped, a k-mer with
    another letter <unk>, lower case and U read as ACGT); overlapping k-mers are given as words
    separated by spaces (the DNABERT convention: HF tokenizers cannot emit overlapping pieces);
    sentencepiece and WordPiece models are carried over piece for piece.
    """
    transformers = require("transformers")
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    from helm.tokenizers import KmerTokenizer, ProteinTokenizer, SentencePieceTokenizer

    vocab = {t: i for i, t in enumerate(tokenizer.tokens)}
    unk = SPECIAL_TOKENS[3]
    if isinstance(tokenizer, (KmerTokenizer, ProteinTokenizer)):
        backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
        k = getattr(tokenizer, "k", 1)
        if isinstance(tokenizer, KmerTokenizer):
            fixes = [normalizers.Replace(a, b) for a, b in zip("acgtuU", "ACGTTT")]
            backend.normalizer = normalizers.Sequence([normalizers.Strip(), *fixes])
        if getattr(tokenizer, "overlap", 0):
            backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        else:
            steps = [pre_tokenizers.Split(Regex(f".{{{k}}}"), behavior="isolated")]
            if k > 1:  # the trailing partial k-mer is its own piece: remove it
                steps.append(pre_tokenizers.Split(Regex(f"^.{{1,{k - 1}}}$"), behavior="removed"))
            backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    elif isinstance(tokenizer, SentencePieceTokenizer):
        sp = tokenizer._sp
        if tokenizer.name == "ug":
            pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
            backend = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=False))
        else:  # BPE: a piece's merge ranks by its id (sentencepiece orders BPE pieces by score)
            merges = [
                (p[:j], p[j:])
                for p in tokenizer.tokens[NUM_SPECIAL:]
                for j in range(1, len(p))
                if p[:j] in vocab and p[j:] in vocab
            ]
            merges.sort(key=lambda m: vocab[m[0] + m[1]])
            backend = Tokenizer(
                models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True)
            )
    else:  # WordPiece: already a HF tokenizers model
        backend = Tokenizer.from_str(tokenizer._hf.to_str())
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    cls, eos = SPECIAL_TOKENS[1], SPECIAL_TOKENS[2]
    single = f"{cls} $A" if causal else f"{cls} $A {eos}"
    backend.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(cls, vocab[cls]), (eos, vocab[eos])]
    )
    pad, _, _, _, mask = SPECIAL_TOKENS
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=cls, eos_token=eos, unk_token=unk, pad_token=pad,
        mask_token=mask, cls_token=cls, sep_token=eos, model_max_length=max_length,
    )  # fmt: skip


def helm_tokenizer(path: Path):
    """The HELM k-mer tokenizer whose vocabulary, in order, is the HF folder's (codon or
    nucleotide); anything else is refused."""
    transformers = require("transformers")
    from helm.tokenizers import KmerTokenizer
    from helm.vocab import kmer_vocab

    try:
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise import_refusal(path, f"no tokenizer could be read ({exc})") from None
    vocab = hf_tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    for k, name in ((3, "codon"), (1, "nucleotide")):
        if tokens == kmer_vocab(k) and [vocab[t] for t in tokens] == list(range(len(tokens))):
            log.info("%s: %s vocabulary (HELM order)", path, name)
            return KmerTokenizer(k)
    shown = ", ".join(tokens[:8])
    raise import_refusal(
        path,
        f"its tokenizer's vocabulary ({len(tokens)} tokens: {shown}, ...) is not HELM's codon or "
        f"nucleotide vocabulary in HELM's order ({', '.join(SPECIAL_TOKENS)}, then the k-mers "
        "over ACGT in lexicographic order)",
    )
