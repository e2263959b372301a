"""Held-out loss: the one evaluation loop behind `mode=loss`, `train_eval`'s in-loop evaluation and `watch`.

Loss = (sum of target-token NLL) / (number of target tokens): float64 sums per window, gathered from every
data-parallel rank, added once with exact rounding and divided once: never a mean of per-batch or per-rank means,
so uneven last batches and padding rows (targets = -100) weigh exactly what they hold, and the total does not
depend on which rank ran a window (a resumed job, evaluation/resume.py, adds up to the same bits).

A *scorer* turns one batch into (nll_sum, token_count). The default one runs the decoder once and projects to
the vocabulary in chunks of `logits_chunk` tokens (auto: about 16M logits per chunk), so the full (B, L, V)
float32 logits tensor the plain transformers loop builds never exists. Parallel layouts supply their own scorer (the pipeline's last stage
computes the loss; other stages only forward), and `run_eval` stays the same.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Scorer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Architectures whose logits are exactly lm_head(last_hidden_state): no softcapping or logit scaling.
_PLAIN_HEAD_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gpt2", "gpt_neox",
                     "phi3", "olmo", "olmo2", "smollm3", "starcoder2", "gemma"}
PPL_CAP = 20.0  # perplexity = exp(min(loss, 20)): an untrained model's huge loss stays a finite, plottable number


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    nll_sum: float
    loss_stderr: float | None = None  # standard error of the loss over windows (None with a single window)
    bpb: float | None = None  # bits per UTF-8 byte (None without a byte table, i.e. without a tokenizer)
    windows: int = 0  # windows evaluated (counted again when eval.steps wraps around)
    window_nll: np.ndarray | None = None  # per-window NLL sums in the global window order (keep_windows=True)
    batch_size: int | None = None  # windows per batch that eval.batch_size=auto chose (None: a fixed setting)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        out = {f"{prefix}loss": self.loss, f"{prefix}perplexity": self.perplexity}
        if self.bpb is not None:
            out[f"{prefix}bpb"] = self.bpb
        if self.loss_stderr is not None:
            out[f"{prefix}loss_stderr"] = self.loss_stderr
        out[f"{prefix}tokens"] = self.tokens
        if self.batch_size is not None:
            out[f"{prefix}batch_size"] = self.batch_size
        return out


def perplexity(loss: float) -> float:
    return math.exp(min(loss, PPL_CAP))


LOGITS_PER_CHUNK = 1 << 24  # 16M logits = 64 MB in float32: big enough for efficient GEMMs, small next to a model


def auto_chunk(head: nn.Module, width: int) -> int:
    """Tokens per chunk so that one chunk's logits hold about LOGITS_PER_CHUNK values."""
    weight = getattr(head, "weight", None)
    vocab = weight.shape[0] if weight is not None and weight.dim() == 2 else width  # Identity: already logits
    return max(1, LOGITS_PER_CHUNK // vocab)


def chunked_nll(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of `targets` (-100 = ignore) under `head(hidden)`, `chunk` tokens of logits at a time.

    Returns (nll, mask), both float64 of `targets`' shape: the NLL of each target token (0 where ignored) and
    1.0 where a target counts. Per token rather than a sum so `run_eval` can weigh tokens by their bytes (bpb)
    and sum per window (standard error, paired tests) without a second forward. Ignored positions are dropped
    before the projection, so padding rows cost nothing. Each chunk's logits are upcast to float32 for the
    log-softmax, which is what makes bf16 evaluation match float32 closely.
    """
    shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    if chunk <= 0:
        chunk = auto_chunk(head, hidden.shape[-1])
    keep = targets != -100
    kept_hidden, kept_targets = (hidden, targets) if bool(keep.all()) else (hidden[keep], targets[keep])
    parts = []
    for start in range(0, kept_targets.numel(), chunk):
        logits = head(kept_hidden[start:start + chunk]).float()
        parts.append(F.cross_entropy(logits, kept_targets[start:start + chunk], reduction="none").double())
    nll = torch.zeros(targets.numel(), dtype=torch.float64, device=hidden.device)
    if parts:
        nll[keep] = torch.cat(parts)
    return nll.reshape(shape), keep.to(torch.float64).reshape(shape)


def document_sep_id(eval_cfg, model_config) -> int | None:
    """The token that ends each document when `eval.doc_mask=true` (else None): `eval.doc_sep_id`, or EOS."""
    if not getattr(eval_cfg, "doc_mask", False):
        return None
    sep = eval_cfg.doc_sep_id if eval_cfg.doc_sep_id is not None else getattr(model_config, "eos_token_id", None)
    if isinstance(sep, (list, tuple)):
        sep = sep[0] if sep else None
    if sep is None:
        from ckpteval.errors import CkptEvalError

        raise CkptEvalError("eval.doc_mask=true needs the token that ends each document and the model config has no "
                            "eos_token_id: set eval.doc_sep_id=N")
    vocab = getattr(model_config, "vocab_size", None)
    if vocab is not None and not 0 <= int(sep) < vocab:
        from ckpteval.errors import CkptEvalError

        raise CkptEvalError(f"eval.doc_sep_id={sep} is outside the model's vocabulary (0..{vocab - 1}), so no "
                            f"document would ever end: use the id of the token that ends documents (often "
                            f"eos_token_id)")
    return int(sep)


def document_layout(inputs: torch.Tensor, sep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids and a (B, 1, L, L) boolean mask (True = attend) for windows packed with whole documents.

    A document ends with its `sep` token; the next one starts right after it. Every token attends causally to
    its own document only and its positions restart at 0, so each document is scored exactly as if it were run
    alone (its first token is predicted from the previous document's `sep`, as in the unmasked stream).
    """
    is_sep = inputs == sep
    seg = torch.cumsum(is_sep, dim=1) - is_sep.long()  # the sep token belongs to the document it ends
    idx = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    starts = torch.ones_like(is_sep)
    starts[:, 1:] = is_sep[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    causal = torch.ones(inputs.shape[1], inputs.shape[1], dtype=torch.bool, device=inputs.device).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    return idx - start_idx, mask[:, None]


def _document_kwargs(model: nn.Module, inputs: torch.Tensor, sep: int, dtype: torch.dtype) -> dict:
    pos, mask = document_layout(inputs, sep)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    if impl and "flash" in impl:  # flash attention finds packed documents from restarting position ids alone
        return {"position_ids": pos}
    if impl == "eager":
        mask = additive_mask(mask, dtype)
    return {"position_ids": pos, "attention_mask": mask}


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True = attend) as the additive float mask eager attention adds to its scores."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def causal_lm_scorer(model: nn.Module, chunk: int = 0, doc_sep: int | None = None, compile: bool = False) -> Scorer:
    """Scorer for a transformers causal LM (plain, FSDP- or TP-sharded); `doc_sep`: see `document_layout`.

    `compile`: the decoder (the whole model for other heads) runs through `torch.compile` (inductor). Batches of
    the loss path have one shape (a pass pads its last batch), so it compiles once; the vocabulary projection
    stays eager and float32, as above."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    decoder = model.get_decoder() if model_type in _PLAIN_HEAD_TYPES else None
    head = model.get_output_embeddings() if decoder is not None else None
    if compile:
        if decoder is not None and head is not None:
            decoder = torch.compile(decoder)
        else:
            model = torch.compile(model)

    def score(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = {}
        if doc_sep is not None:
            dtype = torch.get_autocast_dtype(inputs.device.type) if torch.is_autocast_enabled(inputs.device.type) \
                else next(model.parameters()).dtype
            kwargs = _document_kwargs(model, inputs, doc_sep, dtype)
        if decoder is not None and head is not None:
            hidden = decoder(input_ids=inputs, use_cache=False, **kwargs).last_hidden_state
            return chunked_nll(hidden, head, targets, chunk)
        logits = model(input_ids=inputs, use_cache=False, **kwargs).logits  # exotic heads: exact, not memory-lean
        return chunked_nll(logits, nn.Identity(), targets, chunk)

    return score


def _autocast(device: torch.device, dtype: torch.dtype, model_dtype: torch.dtype | None):
    """bf16 autocast only when the weights are float32 (training); weights already in bf16 need none."""
    if dtype == torch.float32 or model_dtype == dtype:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def run_eval(scorer: Scorer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, device: torch.device,
             dtype: torch.dtype = torch.float32, model_dtype: torch.dtype | None = None, group=None,
             reduce: bool = True, progress: bool = False, total: int | None = None,
             byte_lengths: torch.Tensor | None = None, keep_windows: bool = False) -> EvalResult:
    """Token-weighted loss over `batches` of (inputs (B, L), targets (B, L)); reduced across `group` ranks.

    Every statistic is a sum over windows, gathered from every rank and added once, exactly rounded
    (`windows_result`): loss (NLL / tokens), bpb (NLL of the tokens that stand for >= 1 byte / (ln 2 x their
    bytes), `byte_lengths[id]` = UTF-8 bytes of token id) and the loss's standard error over windows (count, sum
    and sum of squares of per-window mean NLL). The total therefore depends on each window's numbers only, not on
    which rank ran it or in which order: a resumed evaluation (evaluation/resume.py) adds up to the same bits.
    `keep_windows` also returns each window's NLL sum, in the global window order, for paired tests.

    The caller puts the model in eval mode (`evaluating(model)`); this loop never touches model state, so the
    same function serves a standalone checkpoint, a model mid-training, and every parallel layout.
    """
    table = byte_lengths.to(device) if byte_lengths is not None else None
    parts = score_batches(scorer, batches, device=device, dtype=dtype, model_dtype=model_dtype, table=table,
                          progress=progress, total=total)
    rows = torch.cat(parts) if parts else torch.zeros(0, 4, dtype=torch.float64, device=device)
    distributed = reduce and torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size(group) > 1 and parts:
        gathered = [torch.empty_like(rows) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(gathered, rows.contiguous(), group=group)
        # Every rank runs the same number of equally shaped batches: batch s of rank r holds windows
        # s*B*W + r*B + j, so (S, W, B) is the global window order.
        rows = torch.stack([g.reshape(len(parts), -1, 4) for g in gathered], dim=1).reshape(-1, 4)
    return windows_result(rows.cpu().numpy(), table is not None, keep_windows)


def score_batches(scorer: Scorer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, device: torch.device,
                  dtype: torch.dtype = torch.float32, model_dtype: torch.dtype | None = None,
                  table: torch.Tensor | None = None, progress: bool = False, total: int | None = None,
                  on_batch: Callable[[int, torch.Tensor, float], None] | None = None) -> list[torch.Tensor]:
    """`window_sums` of each batch, in order (on `device`). `on_batch(index, sums, start)` sees each batch's
    sums as soon as they are computed (`start`: `time.perf_counter()` when the batch began)."""
    parts: list[torch.Tensor] = []
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, total=total, desc="eval", unit="batch", leave=False)
    with torch.inference_mode(), _autocast(device, dtype, model_dtype):
        for inputs, targets in iterator:
            start = time.perf_counter()
            targets = targets.to(device, non_blocking=True)
            nll, mask = scorer(inputs.to(device, non_blocking=True), targets)
            parts.append(window_sums(nll, mask, targets, table))
            if on_batch is not None:
                on_batch(len(parts) - 1, parts[-1], start)
    return parts


def window_sums(nll: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, table: torch.Tensor | None
                ) -> torch.Tensor:
    """Per window (row), float64 [B, 4]: its NLL sum, target tokens, NLL of the target tokens that stand for
    >= 1 byte, and their bytes (zeros without a byte table). A padding row is all zeros."""
    if table is not None:
        nbytes = table[targets.clamp(min=0)].to(torch.float64) * mask
        byte_nll, total_bytes = (nll * (nbytes > 0)).sum(dim=1), nbytes.sum(dim=1)
    else:
        byte_nll = total_bytes = torch.zeros(nll.shape[0], dtype=torch.float64, device=nll.device)
    return torch.stack([nll.sum(dim=1), mask.sum(dim=1), byte_nll, total_bytes], dim=1)


def windows_result(rows: np.ndarray, with_bytes: bool, keep_windows: bool = False) -> EvalResult:
    """The evaluation's result from every window's `window_sums` row (global window order; padding rows, with no
    tokens, left out). Sums are exactly rounded (`math.fsum`), so they do not depend on the rows' order."""
    real = rows[rows[:, 1] > 0] if len(rows) else np.zeros((0, 4))
    x = real[:, 0] / real[:, 1] if len(real) else real[:, 0]  # per-window mean NLL (standard error)
    sums = [math.fsum(real[:, 0]), math.fsum(real[:, 1]), math.fsum(real[:, 2]), math.fsum(real[:, 3]),
            float(len(real)), math.fsum(x), math.fsum(x * x)]
    return _result(sums, with_bytes, real[:, 0].copy() if keep_windows else None)


def _result(sums: list[float], with_bytes: bool, window_nll: np.ndarray | None) -> EvalResult:
    nll, tokens, byte_nll, total_bytes, n, sx, sxx = sums
    if tokens == 0:
        from ckpteval.errors import CkptEvalError

        raise CkptEvalError("evaluation saw no target tokens: the held-out data is empty or eval.steps=0")
    loss = nll / tokens
    stderr = math.sqrt(max(sxx - sx * sx / n, 0.0) / (n - 1) / n) if n > 1 else None
    bpb = byte_nll / (math.log(2) * total_bytes) if with_bytes and total_bytes > 0 else None
    return EvalResult(loss=loss, perplexity=perplexity(loss), tokens=int(tokens), nll_sum=nll, loss_stderr=stderr,
                      bpb=bpb, windows=int(n), window_nll=window_nll)


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Switch to eval mode for the block and restore the previous mode (training resumes unchanged)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
