"""What ``eval.py pretrain`` computes: a trained model's language-model metrics on a sequence file,
with the checkpoint's own loss, masking (seeded) or shift, and the tree metrics of codon models."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from helm.checkpoint import LoadedModel
from helm.config import dataset_kwargs, loss_kwargs
from helm.data.cache import build_token_cache
from helm.data.dataset import LMDataset
from helm.data.sampler import build_loader
from helm.errors import ConfigError
from helm.lm import LanguageModel, amp_dtype, evaluate
from helm.losses import build_loss

log = logging.getLogger("helm")


def score_file(
    loaded: LoadedModel,
    file: str | Path,
    *,
    column_name: str | None = None,
    file_extension: str | None = None,
    on_invalid: str = "error",
    batch_size: int = 32,
    max_seq_len: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Loss, perplexity, accuracy and (codon models) the tree metrics of every target of ``file``,
    summed over the file; records longer than the model reads are scored on their head, and the
    document says how many tokens were scored (``tokens``) of how many (``tokens_in_file``)."""
    model, tokenizer, cfg = loaded.model, loaded.tokenizer, loaded.config
    device = next(model.parameters()).device
    max_seq_len = max_seq_len or model.cfg.max_seq_len
    if max_seq_len > model.cfg.max_seq_len and model.cfg.pos_embedding in ("absolute", "sincos"):
        raise ConfigError(
            f"--max_seq_len {max_seq_len} exceeds the {model.cfg.max_seq_len} positions the "
            f"model's {model.cfg.pos_embedding} position embedding holds"
        )

    # Data: the trainer's token cache, framing, masking (seeded) or shift, length-sorted batches.
    store = build_token_cache(
        file, tokenizer, column_name=column_name, on_invalid=on_invalid,
        file_extension=file_extension, data_type=loaded.data_type, require_records=True,
    )  # fmt: skip
    dataset_kw = dataset_kwargs(cfg) | dict(max_seq_len=max_seq_len, seed=seed)
    dataset = LMDataset(store, truncation="head", vocab_size=tokenizer.vocab_size, **dataset_kw)
    loader = build_loader(dataset, batch_size=batch_size, train=False)
    content, capacity = np.asarray(store.lengths, dtype=np.int64), dataset.row_budget - 2
    truncated = int((content > capacity).sum())
    if truncated:
        log.warning(
            "%d of %d records are longer than the %d tokens the model reads: only their first "
            "%d tokens are scored (the report's tokens count what was scored)",
            truncated, len(content), capacity, capacity,
        )  # fmt: skip

    # The checkpoint's loss and the tree metrics (codon tokenizers), summed over every target.
    loss_fn = build_loss(
        **loss_kwargs(cfg), vocab_size=tokenizer.vocab_size, is_codon=tokenizer.is_codon,
        hierarchy=loaded.hierarchy,
    ).to(device)  # fmt: skip
    bar = tqdm(loader, desc="pretrain eval", unit="batch", disable=not sys.stderr.isatty())
    metrics = evaluate(
        LanguageModel(model), bar, loss_fn,
        hierarchy=loaded.hierarchy if tokenizer.is_codon else None,
        vocab_size=tokenizer.vocab_size, device=device,
        amp=amp_dtype(device, enabled=device.type == "cuda"), prefix="eval",
    )  # fmt: skip
    return {
        "file": str(file),
        "mode": cfg["mode"],
        "loss": cfg["loss"],
        "seed": seed if cfg["mode"] == "mlm" else None,
        "max_seq_len": max_seq_len,
        "records": len(store),
        "tokens": int(np.minimum(content, capacity).sum()),  # the tokens scored
        "tokens_in_file": store.num_tokens,
        "records_truncated": truncated,
        "metrics": {k.removeprefix("eval_"): v for k, v in metrics.items()},
    }
