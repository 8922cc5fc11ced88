"""Checkpoints: the format, its writing and reading, for training and for evaluation.

``format`` (the file: fields, digest, atomic writes, safe reads), ``manager`` (the run's folder of
checkpoints), ``state`` (the training state, RNG and tokenizer states, ``load_for_eval``);
``python -m helm.checkpoint`` verifies and converts files. A sharded run (``--fsdp``) writes the
same fields as folders instead (``dcp``: the tensors through Distributed Checkpoint, the rest as a
file of this format; ``sharded``: their manager); ``load_checkpoint`` reads such a folder whole.

A checkpoint is one dict, made by ``TrainState.checkpoint`` and read back by ``TrainState.restore``
(resume) or ``load_for_eval`` (eval.py, the test split). Its fields (``format.FIELDS``, the one list
of them):

- ``model``, ``ema``: the raw backbone's state dict, and the EMA's (or None);
- ``optimizer``, ``scheduler``, ``scaler``, ``saver``: their state dicts;
- ``epoch``, ``step``, ``batches_done``, ``bad_epochs``, ``epoch_metrics``: where the run is
  (``batches_done`` batches of epoch ``epoch`` are trained; ``epoch_metrics`` is the last finished
  epoch's validation line, so a resumed run can write it when a kill lost it);
- ``world_size``: the ranks that wrote it (``batches_done`` counts each rank's batches);
- ``rng``: the RNG states of every rank (python, numpy, torch, cuda), as tensors and numbers;
- ``config``, ``model_name``, ``model_config``, ``tokenizer`` (its saved folder as a tar in a uint8
  tensor), ``hierarchy``: what the run is (``RunInfo``), enough to rebuild model, data and loss;
- ``format_version`` (2) and ``digest``: the sha256 of everything else (`payload_digest`).

Only tensors and plain data (dict, list, tuple, str, int, float, bool, None) are stored, so every
file is read with ``torch.load(weights_only=True)``: a file that would need anything else to load
(an object whose unpickling runs code) is refused with `CheckpointError` before anything in it
runs. The digest, checked on every load, names a corrupted file instead of loading it, and so
does a check of the zip structure, for damage torch reads past (a second entry of the same name,
bytes appended, headers that disagree; ``verify`` adds every entry's CRC). Version-1
files (pickled python/numpy RNG states, the tokenizer as raw bytes, no digest) still load: the
numpy array and dtype types their RNG state needs are the only types allowed beside torch's own.
``python -m helm.checkpoint convert OLD NEW`` rewrites one as version 2.

Rank 0 writes each file to a temporary file in the same folder and renames it over the target, so
a crash mid-write leaves the previous file intact (``helm.fileio``; a full disk is one
`CheckpointError` line naming the file and the cause). ``CheckpointManager`` keeps ``last.pt``,
``best.pt`` and the newest ``epoch-NNNN.pt``; at the end of an epoch it writes the epoch file,
then ``best.pt``, then ``last.pt``, so whatever instant a kill strikes, the best epoch that
``last.pt`` records is already in ``best.pt`` or its epoch file (`CheckpointManager.load_best`).
"""

from helm.checkpoint.format import (
    FIELDS,
    FORMAT_VERSION,
    REQUIRED_KEYS,
    CheckpointError,
    RunInfo,
    atomic_save,
    load_checkpoint,
    payload_digest,
    save_checkpoint,
    seal,
    upgrade,
)
from helm.checkpoint.manager import BestCheckpoint, CheckpointManager
from helm.checkpoint.state import (
    LoadedModel,
    TrainState,
    load_for_eval,
    rng_state,
    seed_everything,
    set_rng_state,
    tokenizer_from_state,
    tokenizer_state,
)

__all__ = [
    "FIELDS",
    "FORMAT_VERSION",
    "REQUIRED_KEYS",
    "BestCheckpoint",
    "CheckpointError",
    "CheckpointManager",
    "LoadedModel",
    "RunInfo",
    "TrainState",
    "atomic_save",
    "load_checkpoint",
    "load_for_eval",
    "payload_digest",
    "rng_state",
    "save_checkpoint",
    "seal",
    "seed_everything",
    "set_rng_state",
    "tokenizer_from_state",
    "tokenizer_state",
    "upgrade",
]
