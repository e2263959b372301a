"""`batch_size=auto`: the largest batch that fits the device's free memory, found by a short probe.

    python run.py mode=loss ckpt=PATH data=demo eval.steps=-1 eval.batch_size=auto
    python run.py mode=loss ckpt=PATH data=demo eval.steps=-1 eval.batch_size=auto eval.memory_budget_gb=4
    python run.py mode=harness ckpt=PATH harness.batch_size=auto            # FastLM: tokens per forward

The probe runs the real forward (the same scorer, dtype and sequence length) on random tokens at 1 and 2 rows
and measures the peak memory above what was allocated before: on CUDA the caching allocator's own peak
(`max_memory_allocated`), on the CPU the process's resident high-water mark (`/proc/self/clear_refs`), never
less than the analytic count below. Two points give bytes per row and fixed bytes (the chunked vocabulary
projection, workspaces); the batch is the most rows whose peak fits the budget: `memory_budget_gb`, else
0.9 x the GPU's free memory (free + what torch's allocator holds unused), 0.5 x the CPU's available RAM. The
answer is kept per process for each (architecture, dtype, sequence length, device, budget), so every checkpoint
of a scan or watcher gets the same batch without probing again.

An out-of-memory error in the run does not end it: the batch in hand is split into pieces of 3/4 the size and
the run goes on; the smaller size is kept for later batches. The windows of a batch never change, so the numbers
are those of the batch size that was chosen (up to float reduction order). A fixed batch size that runs out of
memory is one error line saying what to set.

lm-eval's HFLM `--batch_size auto` is the anchor: it runs its longest request at 64 rows five times and shrinks
by 10% after each out-of-memory error (on a CPU there is none, so it always takes 64). Knowing the shape of our
own forward, we measure instead of trying: one probe, no failed allocations, and a CPU gets an answer too.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ckpteval.errors import CkptEvalError

log = logging.getLogger("ckpteval")

AUTO = "auto"
GPU_FRACTION = 0.9  # of free GPU memory (fragmentation and cuBLAS/attention workspaces take the rest)
CPU_FRACTION = 0.5  # of available RAM: the machine is shared with the OS page cache and other processes
MAX_ROWS = 256  # more rows per forward only adds latency: a GPU is saturated long before
MAX_TOKENS = 1 << 16  # tokens per forward (65k): GEMMs this tall already run at a GPU's peak
SHRINK = 0.75  # after an out-of-memory error, the next size


# ---------------------------------------------------------------------------------------------- settings


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


def check_batch_setting(key: str, value: Any) -> None:
    """`key` (eval.batch_size, harness.batch_size) is a positive integer or `auto`."""
    if is_auto(value):
        return
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            ok = isinstance(value, str) and int(value) >= 1
        except ValueError:
            ok = False
        if not ok:
            raise CkptEvalError(f"{key}={value} is not a batch size: use a positive integer ({key}=8) or {key}=auto "
                                "(the most that fit in memory)")
    elif value < 1:
        raise CkptEvalError(f"{key}={value} is out of range: use 1 or more, or {key}=auto")


def check_config(cfg) -> None:
    """Config-only checks of the batch-size, memory-budget and compile settings (called by `job.validate_config`)."""
    from omegaconf import OmegaConf

    mode = str(OmegaConf.select(cfg, "mode.name", default="") or "")
    layout = str(OmegaConf.select(cfg, "parallel.name", default="none") or "none")
    for key in ("eval.batch_size", "harness.batch_size"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            check_batch_setting(key, value)
    for key in ("eval.memory_budget_gb", "harness.memory_budget_gb"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                                  or value == float("inf")):
            raise CkptEvalError(f"{key}={value:g} is out of range: use a positive number of GB, or null for the "
                                "default (0.9 x free GPU memory, 0.5 x available RAM)")
    if is_auto(OmegaConf.select(cfg, "eval.batch_size", default=None)) and layout != "none":
        raise CkptEvalError(f"eval.batch_size=auto probes one whole model per process: with parallel={layout} every "
                            "rank must run the same batch, so set eval.batch_size=N")
    if OmegaConf.select(cfg, "eval.compile", default=False):
        if layout != "none":
            raise CkptEvalError(f"eval.compile=true compiles a whole model per process (parallel=none): with "
                                f"parallel={layout} leave eval.compile=false")
        if mode == "train_eval":
            raise CkptEvalError("eval.compile=true applies to evaluating saved checkpoints (mode=loss, watch, scans): "
                                "train_eval evaluates the model it trains, which changes every step; leave it false")


# ---------------------------------------------------------------------------------------------- memory


def is_oom(exc: BaseException) -> bool:
    """CUDA's torch.OutOfMemoryError, or a CPU allocation that failed ("DefaultCPUAllocator: can't allocate")."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)


def free_cached(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def available_ram() -> int:
    """MemAvailable (what the kernel can hand out without swapping), else free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(device: torch.device, budget_gb: float | None) -> tuple[int, str]:
    """(bytes a batch may use above what is allocated now, how that was decided)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        found, what = int(free * GPU_FRACTION), f"{GPU_FRACTION:g} x {free / 2**30:.1f} GB free on {device}"
    else:
        ram = available_ram()
        found, what = int(ram * CPU_FRACTION), f"{CPU_FRACTION:g} x {ram / 2**30:.1f} GB available RAM"
    if budget_gb is not None:
        asked = int(float(budget_gb) * 2**30)
        if device.type == "cuda" and asked > found:
            return found, f"{what} (below memory_budget_gb={budget_gb:g})"
        return asked, f"memory_budget_gb={budget_gb:g}"
    return found, what


def size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MB"


def _status_kb(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise OSError(name)


def measure_peak(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes `fn()` allocates above what was in use before it (None where this cannot be measured)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    if device.type != "cpu":
        fn()
        return None
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the resident high-water mark restarts from now
        base = _status_kb("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return max(0, (_status_kb("VmHWM") - base) * 1024)


# ---------------------------------------------------------------------------------------------- analytic counts


def _dims(config) -> dict[str, int]:
    hidden = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return {"hidden": hidden, "heads": heads, "head_dim": head_dim,
            "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
            "inter": int(getattr(config, "intermediate_size", None) or 4 * hidden),
            "layers": int(getattr(config, "num_hidden_layers", 1) or 1), "vocab": int(config.vocab_size)}


def activation_bytes_per_token(config, act_bytes: int) -> int:
    """Live bytes per token at the peak of one decoder layer in inference (nothing kept for backward): the
    residual stream and its normed copy (float32 inside RMSNorm), q/k/v and the attention output, the MLP's gate,
    up and their product."""
    d = _dims(config)
    qkv = d["heads"] * d["head_dim"] + 2 * d["kv_heads"] * d["head_dim"]
    return act_bytes * (3 * d["hidden"] + qkv + d["heads"] * d["head_dim"] + 3 * d["inter"]) + 8 * d["hidden"]


def attention_bytes_per_query(config, keys: int, masked: bool, device: torch.device) -> int:
    """Bytes per query token that grow with the keys it sees: an explicit mask (1 byte per key, bool) and, where
    no fused kernel takes the mask (CPU), the float32 scores and probabilities of every head."""
    if not masked:
        return 0
    heads = _dims(config)["heads"]
    return keys * (1 + (0 if device.type == "cuda" else 8 * heads))


def logits_bytes(config, chunk_tokens: int) -> int:
    """One chunk of the vocabulary projection: logits in the compute dtype, their float32 copy, log-softmax."""
    return chunk_tokens * _dims(config)["vocab"] * 12


def kv_bytes_per_token(config, act_bytes: int) -> int:
    d = _dims(config)
    return d["layers"] * 2 * d["kv_heads"] * d["head_dim"] * act_bytes


# ---------------------------------------------------------------------------------------------- the probe


@dataclass
class Fit:
    """Bytes one forward needs: `fixed` + `per_row` x rows (rows of the probed length), + (the loss path, when a
    window holds less than a chunk of the vocabulary projection) `logit_bytes` per token of rows x `row_tokens`
    up to one chunk of `logit_tokens`: the logits grow with the rows until a chunk is full, then stay."""

    per_row: int
    fixed: int
    budget: int
    budget_what: str
    measured: bool
    row_tokens: int = 0
    logit_bytes: int = 0
    logit_tokens: int = 0

    def need(self, rows: int) -> int:
        return self.fixed + self.per_row * rows + self.logit_bytes * min(self.logit_tokens, rows * self.row_tokens)

    def rows(self, budget: int | None = None) -> int:
        budget = self.budget if budget is None else budget
        if not self.logit_bytes:
            return max(0, (budget - self.fixed) // max(1, self.per_row))
        full = -(-self.logit_tokens // max(1, self.row_tokens))  # from this many rows on, a chunk is full
        if self.need(full) <= budget:
            return (budget - self.fixed - self.logit_bytes * self.logit_tokens) // max(1, self.per_row)
        return max(0, (budget - self.fixed) // max(1, self.per_row + self.logit_bytes * self.row_tokens))


def probe(run: Callable[[int], Any], device: torch.device, budget: int, budget_what: str, *, per_row_floor: int,
          fixed_floor: int) -> Fit:
    """Measure `run(rows)` at 1 and 2 rows (after a warm-up at 1) -> bytes per row and fixed bytes. The analytic
    floors count what must be live at the peak; on CUDA the allocator's count is exact and used as it is, on the CPU
    the RSS high-water mark can miss what was already mapped, so the larger of the two counts."""
    run(1)
    one = measure_peak(lambda: run(1), device)
    two = measure_peak(lambda: run(2), device)
    free_cached(device)
    if one is None or two is None:
        return Fit(per_row_floor, fixed_floor, budget, budget_what, measured=False)
    per_row, fixed = max(two - one, 1), max(one - max(two - one, 1), 0)
    if device.type != "cuda":
        per_row, fixed = max(per_row, per_row_floor), max(fixed, fixed_floor)
    return Fit(per_row, fixed, budget, budget_what, measured=True)


_FITS: dict[tuple, Fit] = {}  # per process: (architecture, dtype, seq_len, device, budget, ...) -> the probe's fit
_ROWS: dict[tuple, int] = {}  # per process: the rows that last ran without running out of memory
_SCALES: dict[tuple, float] = {}  # per process: FastLM's share of its budget after out-of-memory errors


def model_key(model, *extra) -> tuple:
    """What the probe's answer depends on: the architecture (not the weights), its dtype and device, and `extra`."""
    first = next(model.parameters())
    config = model.config
    dims = tuple(sorted(_dims(config).items()))
    impl = getattr(config, "_attn_implementation", None)
    return (type(model).__name__, getattr(config, "model_type", None), dims, impl, str(first.dtype),
            str(first.device), sum(p.numel() for p in model.parameters()), *extra)


def cached_fit(key: tuple, make: Callable[[], Fit]) -> Fit:
    if key not in _FITS:
        _FITS[key] = make()
    return _FITS[key]


def shrink(key: tuple, rows: int, what: str, device: torch.device) -> int:
    """The next size after `rows` ran out of memory (kept for this key); an error when one row does not fit."""
    free_cached(device)
    if rows <= 1:
        raise CkptEvalError(f"out of memory on {device} with a single row: {what}")
    smaller = max(1, int(rows * SHRINK))
    _ROWS[key] = smaller
    log.warning("out of memory on %s at %d rows per forward: going on with %d", device, rows, smaller)
    return smaller


def clear_cache() -> None:
    """Forget every probe (tests; a process that changes what else lives on the device)."""
    _FITS.clear()
    _ROWS.clear()
    _SCALES.clear()


# ---------------------------------------------------------------------------------------------- the loss path


@dataclass
class LossBatch:
    """The loss path's batch: `windows` per logical batch (the windows evaluated, as an explicit
    eval.batch_size), `rows` per forward (fewer after an out-of-memory error)."""

    windows: int
    rows: int
    auto: bool
    key: tuple = ()


def loss_batch(cfg, model, scorer, n_windows: int, dp_size: int, device: torch.device, dtype: torch.dtype
               ) -> LossBatch:
    """`eval.batch_size` as windows per batch: the setting, or for `auto` the probe's answer (at most the windows
    each rank has, so one pass needs no padding rows beyond the last batch's)."""
    setting = cfg.eval.batch_size
    if not is_auto(setting):
        return LossBatch(int(setting), int(setting), auto=False)
    seq = int(cfg.eval.seq_len)
    doc_mask = bool(cfg.eval.get("doc_mask", False))
    budget_gb = cfg.eval.get("memory_budget_gb")
    key = model_key(model, "loss", seq, str(dtype), doc_mask, int(cfg.eval.logits_chunk), budget_gb)
    fit = cached_fit(key, lambda: _probe_loss(model, scorer, seq, device, dtype, doc_mask, int(cfg.eval.logits_chunk),
                                              budget_gb, cfg.eval))
    rows = min(fit.rows(), MAX_ROWS, max(1, MAX_TOKENS // seq))
    if rows < 1:
        raise CkptEvalError(f"eval.batch_size=auto: one window of eval.seq_len={seq} needs "
                            f"{size(fit.per_row + fit.fixed)} and the budget is {size(fit.budget)} "
                            f"({fit.budget_what}): lower eval.seq_len, use eval.dtype=bfloat16, or raise "
                            "eval.memory_budget_gb")
    per_rank = -(-n_windows // max(1, dp_size)) if n_windows else rows
    windows = max(1, min(rows, per_rank))
    if dp_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        agreed = torch.tensor([windows], device=device)  # every rank runs the same batches: the smallest answer
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        windows = int(agreed.item())
    log.info("eval.batch_size=auto: %d windows of %d tokens per batch (%s %s per window + %s; budget %s = %s)",
             windows, seq, "measured" if fit.measured else "counted", size(fit.per_row),
             size(fit.need(windows) - fit.per_row * windows), size(fit.budget), fit.budget_what)
    return LossBatch(windows, min(windows, _ROWS.get(key, windows)), auto=True, key=key)


def _probe_loss(model, scorer, seq: int, device: torch.device, dtype: torch.dtype, doc_mask: bool, chunk: int,
                budget_gb, eval_cfg=None) -> Fit:
    """The fit of `scorer`'s forward at `seq` tokens per window. Where a window holds less than two chunks of the
    vocabulary projection, the logits would grow from 1 to 2 probed rows and then stop growing (one chunk at a
    time): counted as per-row bytes they would cut the batch by up to the logits' share. So the probe then runs with
    chunks of half a window (both probes hold the same logits: the slope is the decoder's alone) and the logits of
    the real chunk are counted apart (`logits_bytes` per token, up to one chunk)."""
    from ckpteval.evaluation.loss import _PLAIN_HEAD_TYPES, _autocast, auto_chunk, causal_lm_scorer, document_sep_id

    budget, what = memory_budget(device, budget_gb)
    config = model.config
    vocab = int(config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    model_dtype = next(model.parameters()).dtype

    head = model.get_output_embeddings()
    chunk = chunk if chunk > 0 else (auto_chunk(head, config.hidden_size) if head is not None else seq)
    apart = (head is not None and getattr(config, "model_type", None) in _PLAIN_HEAD_TYPES and 2 * chunk > seq
             and eval_cfg is not None)
    probe_chunk = max(1, seq // 2) if apart else min(chunk, seq)
    probe_scorer = causal_lm_scorer(model, probe_chunk, document_sep_id(eval_cfg, config)) if apart else scorer

    def run(rows: int) -> None:
        tokens = torch.randint(0, vocab, (rows, seq + 1), generator=gen)
        with torch.inference_mode(), _autocast(device, dtype, model_dtype):
            nll, _ = probe_scorer(tokens[:, :-1].to(device), tokens[:, 1:].to(device))
            nll.sum().item()

    act = max(torch.finfo(dtype).bits, torch.finfo(model_dtype).bits) // 8
    per_row = seq * (activation_bytes_per_token(config, act) + attention_bytes_per_query(config, seq, doc_mask,
                                                                                          device) + 16)
    fit = probe(run, device, budget, what, per_row_floor=per_row, fixed_floor=logits_bytes(config, probe_chunk))
    if not apart:
        return fit
    fit.fixed = max(0, fit.fixed - logits_bytes(config, probe_chunk))
    fit.row_tokens, fit.logit_bytes, fit.logit_tokens = seq, logits_bytes(config, 1), chunk
    return fit


def resilient_scorer(scorer, batch: LossBatch, device: torch.device):
    """`scorer` run `batch.rows` rows at a time; after an out-of-memory error (auto) the rows in hand are split
    smaller and the run goes on; with a fixed eval.batch_size, one error line saying what to set."""

    def score(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts, start, n = [], 0, inputs.shape[0]
        while start < n:
            rows = min(batch.rows, n - start)
            failed = False
            try:
                parts.append(scorer(inputs[start:start + rows], targets[start:start + rows]))
            except RuntimeError as exc:  # torch.OutOfMemoryError is one
                if not is_oom(exc):
                    raise
                failed = True
            if failed:  # outside the except block: the exception's frames (and their tensors) are gone
                if not batch.auto:
                    free_cached(device)
                    raise CkptEvalError(f"out of memory on {device} at eval.batch_size={batch.windows} x "
                                        f"{inputs.shape[1]} tokens: use a smaller eval.batch_size, or "
                                        "eval.batch_size=auto") from None
                batch.rows = shrink(batch.key, rows, "lower eval.seq_len or use eval.dtype=bfloat16", device)
                continue
            start += rows
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    return score



# ---------------------------------------------------------------------------------------------- FastLM


PROBE_TOKENS = 2048  # FastLM probes packed rows of at most min(max_length, this) tokens; longer rows are counted
MIN_PROBE_TOKENS = 256  # ... and at least this many: the first rows asked for, rounded up to a power of two


class RowPlanner:
    """FastLM's rows per forward: `harness.batch_size=N`, or (auto) as many rows of a batch's length as the budget
    holds. A packed row of T tokens seeing K keys costs about a x T + b x T x K bytes: `b` (the explicit mask, and
    where no fused kernel takes it, the scores) is counted, `a` measured by a probe of masked rows of the probe
    length, every position scored (FastLM's costliest forward). The probe length is what the run asks for first
    (rounded up to a power of two, MIN_PROBE_TOKENS..PROBE_TOKENS): on a CPU a probe at the model's full length
    costs more than a short task's whole run. Generation keeps half the budget for the KV slots (exact: rows x
    (prompt + max_gen_toks) x layers x 2 x kv heads x head dim) and half for prefills."""

    def __init__(self, lm, setting, budget_gb: float | None = None) -> None:
        self.lm = lm
        self.auto = is_auto(setting)
        self.fixed = None if self.auto else int(setting)
        self.budget_gb = budget_gb
        self._key: tuple = ()
        self._fit: Fit | None = None
        self._coef: tuple[float, float] = (0.0, 0.0)
        self._length = 0

    def probe_length(self, tokens: int) -> int:
        """Rows of `tokens` tokens -> the probe length: a power of two, MIN_PROBE_TOKENS..PROBE_TOKENS, at most the
        model's max_length."""
        rounded = 1 << max(0, int(tokens) - 1).bit_length()
        return max(1, min(int(self.lm.max_length), PROBE_TOKENS, max(MIN_PROBE_TOKENS, rounded)))

    # ---- the probe
    def fit(self, tokens: int = PROBE_TOKENS) -> Fit:
        """The probe's fit, made on the first call at the length of the `tokens` asked for then."""
        if self._fit is None:
            lm = self.lm
            length = self._length = self.probe_length(tokens)
            self._key = model_key(lm.model, "fastlm", length, str(lm.compute_dtype), self.budget_gb)
            self._fit = cached_fit(self._key, lambda: self._probe(length))
            b = attention_bytes_per_query(lm.model.config, 1, True, lm.device)
            a = max(self._fit.per_row / length - b * length, self._floor_per_token())
            self._coef = (a, b)
            log.info("harness.batch_size=auto: %d tokens per forward at %d-token rows (%s %s per row + %s; budget "
                     "%s = %s)", self.tokens_per_forward(length), length,
                     "measured" if self._fit.measured else "counted", size(self._fit.per_row), size(self._fit.fixed),
                     size(self._fit.budget), self._fit.budget_what)
        return self._fit

    def _floor_per_token(self) -> int:
        lm = self.lm
        act = max(torch.finfo(lm.compute_dtype).bits, torch.finfo(next(lm.model.parameters()).dtype).bits) // 8
        return activation_bytes_per_token(lm.model.config, act) + 24

    def _probe(self, length: int) -> Fit:
        lm = self.lm
        budget, what = memory_budget(lm.device, self.budget_gb)
        config = lm.model.config
        per_row = length * (self._floor_per_token() + attention_bytes_per_query(config, length, True, lm.device))
        from ckpteval.evaluation.loss import auto_chunk

        head = lm.model.get_output_embeddings()
        chunk = auto_chunk(head, config.hidden_size) if head is not None else length
        return probe(lambda rows: lm.probe_forward(rows, length), lm.device, budget, what, per_row_floor=per_row,
                     fixed_floor=logits_bytes(config, min(chunk, length)))

    # ---- the answers
    @property
    def scale(self) -> float:
        """Share of the budget in use: 3/4 less after each out-of-memory error, kept for this model's later runs."""
        return _SCALES.get(self._key, 1.0)

    @property
    def cap(self) -> int:
        """The most rows per forward (and decoding slots): MAX_ROWS, less after an out-of-memory error."""
        return _ROWS.get(self._key, MAX_ROWS)

    def _budget(self, share: float = 1.0, tokens: int = PROBE_TOKENS) -> float:
        fit = self.fit(tokens)
        return (fit.budget * share - fit.fixed) * self.scale

    def rows(self, tokens: int, keys: int | None = None, share: float = 1.0) -> int:
        """Rows of `tokens` tokens (each seeing `keys` keys, default `tokens`) per forward."""
        if not self.auto:
            return self.fixed
        keys = tokens if keys is None else keys
        budget = self._budget(share, keys)
        a, b = self._coef
        fits = int(budget // max(1.0, a * tokens + b * tokens * keys))
        if fits < 1:
            raise CkptEvalError(f"harness.batch_size=auto: one row of {tokens} tokens does not fit in the memory "
                                f"budget ({size(self.fit().budget)}, {self.fit().budget_what}): raise "
                                "harness.memory_budget_gb or use harness.dtype=bfloat16")
        return max(1, min(fits, self.cap, max(1, MAX_TOKENS // max(1, tokens))))

    def gen_rows(self, cap: int) -> int:
        """Decoding slots for sequences of at most `cap` tokens (prompt + max_gen_toks)."""
        if not self.auto:
            return self.fixed
        lm = self.lm
        kv = kv_bytes_per_token(lm.model.config, torch.finfo(lm.compute_dtype).bits // 8)
        vocab = int(lm.model.config.vocab_size)
        fits = int(self._budget(0.5, cap) // (cap * kv + 16 * vocab))
        return max(1, min(fits, self.cap))

    def tokens_per_forward(self, length: int | None = None) -> int:
        length = length or self._length or self.probe_length(PROBE_TOKENS)
        return self.rows(length) * length

    def chosen(self) -> dict[str, int]:
        """What auto chose, for the results (empty when fixed or never probed): tokens per forward at the probe
        length (the length the run asked for first, rounded up to a power of two)."""
        if not self.auto or self._fit is None:
            return {}
        return {"batch_tokens": self.tokens_per_forward()}

    def after_oom(self, rows: int) -> int:
        """The most rows to use after `rows` ran out of memory (auto), else the error line."""
        device = self.lm.device
        free_cached(device)
        if not self.auto:
            raise CkptEvalError(f"out of memory on {device} at harness.batch_size={self.fixed}: use a smaller "
                                "harness.batch_size, or harness.batch_size=auto")
        if rows <= 1:
            raise CkptEvalError(f"out of memory on {device} with a single row: lower max_length or use "
                                "harness.dtype=bfloat16")
        smaller = max(1, int(rows * SHRINK))
        _SCALES[self._key] = self.scale * SHRINK
        _ROWS[self._key] = min(self.cap, smaller)
        log.warning("out of memory on %s at %d rows per forward: going on with at most %d", device, rows, smaller)
        return smaller
