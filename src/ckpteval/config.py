"""Structured (typed) configuration: the schema every YAML file under ``conf/`` is merged into.

Registered in Hydra's ConfigStore as ``base_config``; ``conf/config.yaml`` lists it first in its defaults, so
a misspelt key (``eval.stpes=3``) or a wrong type (``eval.steps=abc``) fails at compose time with Hydra's
message naming the key. Each field carries a one-line docstring-comment; the README's config table mirrors it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ckpteval import dtypes


class Choice(str, Enum):
    """A config choice: an Enum, so a value outside the list fails at compose time naming the valid ones; a
    ``str`` that formats as its plain value, so the code reads and compares it like the string it was."""

    __str__ = str.__str__
    __format__ = str.__format__


class ModeName(Choice):
    train_eval = "train_eval"
    loss = "loss"
    harness = "harness"
    convert = "convert"
    prepare = "prepare"
    watch = "watch"
    replay = "replay"
    compare = "compare"
    ui = "ui"


class ParallelName(Choice):
    none = "none"
    fsdp = "fsdp"
    tp = "tp"
    pp = "pp"
    ep = "ep"


class DataKind(Choice):
    local = "local"
    hf = "hf"


# The dtype names are dtypes.py's (one list each); the Enums make a name outside them a compose-time error.
TokenDtype = Choice("TokenDtype", [(name, name) for name in dtypes.TOKEN])
ComputeDtype = Choice("ComputeDtype", [(name, name) for name in dict.fromkeys(dtypes.COMPUTE.values())])


class HarnessBackend(Choice):
    fast = "fast"
    hf = "hf"
    subprocess = "subprocess"


class WatchOrder(Choice):
    oldest = "oldest"
    newest = "newest"


class EvalKind(Choice):
    """What the watcher runs per checkpoint (`watch.plan`): the per-checkpoint evaluation of `mode=loss` or
    `mode=harness`."""

    loss = "loss"
    harness = "harness"


# torch.distributed.pipelining's single-stage schedules; "1F1B" is no Python name, hence the functional form.
PPSchedule = Choice("PPSchedule", [("GPipe", "GPipe"), ("1F1B", "1F1B")])


@dataclass
class ModeConfig:
    name: ModeName = MISSING  # which mode runs: train_eval | loss | harness | convert | prepare | watch | replay |
    #                            compare | ui


@dataclass
class ParallelConfig:
    name: ParallelName = ParallelName.none  # none | fsdp | tp | pp | ep (launch under torchrun for anything but none)
    dp: int = -1  # data-parallel degree; -1 = world_size / (tp * pp)
    tp: int = 1  # tensor-parallel degree (parallel=tp)
    pp: int = 1  # pipeline stages (parallel=pp)
    ep: int = 1  # expert-parallel degree (parallel=ep): MoE experts split over groups of ep ranks, tokens all-to-all
    pp_schedule: PPSchedule = PPSchedule.GPipe  # GPipe | 1F1B (single-stage schedules of torch.distributed.pipelining)
    microbatches: int = 4  # pipeline microbatches per batch (batch_size must be divisible)
    param_dtype: Optional[ComputeDtype] = None  # FSDP mixed precision: parameter dtype for compute (bfloat16, ...)
    reduce_dtype: Optional[ComputeDtype] = None  # FSDP mixed precision: gradient reduction dtype
    backend: Optional[str] = None  # process-group backend; None = nccl on CUDA, gloo on CPU


@dataclass
class DataConfig:
    kind: DataKind = DataKind.local  # local (token shards) | hf (Hugging Face dataset, tokenized on the fly)
    # -- local: raw token streams
    dataset_path: Optional[str] = None  # held-out data dir (local) evaluated by every loss evaluation
    train_path: Optional[str] = None  # training data dir (train_eval only)
    file_pattern: str = "*.bin"  # glob under dataset_path/train_path; files sorted by path
    dtype: TokenDtype = TokenDtype.uint16  # token dtype of .bin files (uint16 | uint32 | int32 | int64)
    # -- hf: a datasets dataset, loaded offline
    name: Optional[str] = None  # save_to_disk dir, data-file dir/file (json/jsonl/parquet/txt), or hub name in the local cache
    config: Optional[str] = None  # dataset config name
    split: str = "validation"  # held-out split
    train_split: str = "train"  # training split (train_eval with data=hf)
    text_field: str = "text"  # column holding the document text
    # -- both
    demo: bool = False  # build the demo corpus from the Python standard library on first use (data=demo)
    num_proc: int = 1  # tokenization processes for data=hf


@dataclass
class ModelConfig:
    """A Hugging Face config for models trained from scratch, and the fallback architecture for a DCP
    checkpoint with no config.json in or beside it. Field names are transformers' own."""

    architectures: list[str] = field(default_factory=lambda: ["LlamaForCausalLM"])
    model_type: str = "llama"
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # any other transformers config field


@dataclass
class EvalConfig:
    enabled: bool = True  # train_eval: evaluate held-out loss during training
    interval: int = 100  # train_eval: evaluate every N optimizer steps (and at the last step)
    steps: int = 20  # batches per evaluation; -1 = exactly one pass over every window
    batch_size: Any = 8  # windows per batch (per data-parallel rank), or auto: the most that fit in memory (parallel=none)
    memory_budget_gb: Optional[float] = None  # batch_size=auto: memory a batch may use; default 0.9 x free GPU memory, 0.5 x available RAM
    compile: bool = False  # torch.compile the decoder (parallel=none): same loss to 1e-5 (float32), faster on a GPU
    seq_len: int = 256  # tokens per window (inputs); targets are the next L tokens
    dtype: ComputeDtype = ComputeDtype.float32  # float32 | bfloat16 | float16: compute dtype (loss always accumulated in float32)
    logits_chunk: int = 0  # tokens per chunk of the vocabulary projection; 0 = auto (~16M logits, 64 MB float32)
    doc_mask: bool = False  # keep document boundaries in a window: attend within a document, positions restart
    doc_sep_id: Optional[int] = None  # token that ends a document (doc_mask); default: the model's eos_token_id
    device: Optional[str] = None  # cpu | cuda | cuda:N; default: cuda when available, else cpu
    # extra held-out sets beside `data`: NAME -> the fields of a DataConfig (kind local|hf); metrics eval/NAME/...
    # (untyped here: OmegaConf cannot merge a command-line `+eval.sets.NAME={...}` into a typed dict value; each
    # set is merged into the DataConfig schema by job.validate_config, before anything loads)
    sets: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch (per data-parallel rank)
    seq_len: int = 128  # tokens per training sequence
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30  # linear warmup steps
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # max global gradient norm; <= 0 disables clipping
    dtype: ComputeDtype = ComputeDtype.float32  # float32 | bfloat16 (autocast; master weights stay float32)
    seed: int = 1234
    log_interval: int = 10  # log train/loss, lr, tokens/s every N steps


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # where step_{N} dirs go; default: <run dir>/checkpoints
    interval: int = 100  # save every N steps (and at the last step); <= 0 = only at the end
    resume: bool = False  # continue from the newest complete step_{N} in dir
    keep_last: int = 0  # keep only the newest N checkpoints (0 = keep all)


@dataclass
class TrackingConfig:
    enabled: bool = True  # log to MLflow (rank 0)
    uri: str = "sqlite:///outputs/mlflow.db"  # MLflow tracking URI (sqlite file, http(s)://server, databricks)
    experiment: Optional[str] = None  # MLflow experiment; conf default: one per training run (tracking/naming.py)
    run_name: Optional[str] = None  # default: "<mode>/<checkpoint name>"
    artifact_location: Optional[str] = None  # for a new experiment; default: outputs/mlartifacts beside a sqlite store
    timeout_s: float = 10.0  # connect timeout for a remote server; unreachable = clear error, nothing runs
    parent_run_id: Optional[str] = None  # set by sweeps: nest this job's run under a parent
    tags: dict[str, str] = field(default_factory=dict)  # extra tags for the run
    outbox: str = "${paths.outputs}/tracking_outbox"  # results kept while the store is away + running-run markers
    replay: bool = False  # replay the outbox to the store and exit (same as mode=replay)


@dataclass
class HarnessConfig:
    tasks: list[str] = field(default_factory=lambda: ["hellaswag", "arc_easy", "arc_challenge", "winogrande", "piqa", "boolq"])
    num_fewshot: Optional[int] = None  # None = each task's default
    batch_size: Any = 8  # rows per forward, or auto: fast: a token budget from free memory; hf/subprocess: lm-eval's own auto
    memory_budget_gb: Optional[float] = None  # batch_size=auto (fast): memory a batch may use; default as eval.memory_budget_gb
    limit: Optional[float] = None  # examples per task (int) or fraction (< 1.0)
    seed: int = 1234
    include_path: Optional[str] = None  # dir of extra task YAMLs
    log_samples: bool = True  # keep per-sample logs as an MLflow artifact
    gen_kwargs: Optional[str] = None  # generation tasks: "temperature=0,max_gen_toks=64"
    apply_chat_template: bool = False
    backend: HarnessBackend = HarnessBackend.fast  # fast (FastLM: HFLM's numbers, shared contexts run once) | hf (lm-eval HFLM) | subprocess (lm_eval CLI)
    dtype: ComputeDtype = ComputeDtype.float32  # float32 | bfloat16
    allow_code_execution: bool = False  # tasks that execute model-written code stay refused unless true
    trust_remote_code: bool = False
    cache_dir: Optional[str] = None  # conversion cache for backend=subprocess; default <paths.outputs>/converted
    prefix_cache_tokens: int = 8192  # fast backend: cap on shared-prefix tokens whose KV is kept (0: no sharing)
    request_cache: bool = True  # build tasks' requests once per scan/watcher (memory + request_cache_dir)
    request_cache_dir: Optional[str] = None  # built requests as JSON across processes; default <paths.outputs>/harness_requests
    bpb: bool = True  # harness/{task}/bpb: bits per byte of each document's gold continuation (fast/hf; subprocess: from its samples)
    task_index_dir: Optional[str] = None  # lm-eval's task index as JSON across processes; default <paths.outputs>/harness_task_index


@dataclass
class ConvertConfig:
    out: Optional[str] = None  # output HF dir; default: <paths.outputs>/converted/<name>-<path hash>
    tolerance: float = 1e-5  # max abs logits difference allowed between source and converted model
    dtype: ComputeDtype = ComputeDtype.float32  # dtype of the saved safetensors (float32 | bfloat16)


@dataclass
class PrepareConfig:
    source: Optional[str] = None  # folder of text files; default: the Python standard library (the demo corpus)
    out: Optional[str] = None  # output dir (train/, validation/, tokenizer.json); default paths.demo_data
    glob: str = "**/*.py"  # which files under source
    vocab_size: int = 4096  # BPE vocabulary trained on the corpus
    val_fraction: float = 0.05  # fraction of documents (by hash) held out for validation
    max_chars: int = 8_000_000  # cap on corpus size (characters) to keep preparation fast
    seed: int = 0


@dataclass
class HeavyConfig:
    tasks: list[str] = field(default_factory=list)  # heavy suites (e.g. mmlu) run on a step cadence
    num_fewshot: Optional[int] = None
    every_n_steps: int = 0  # run heavy tasks when step % every_n_steps == 0 (0 = never)
    limit: Optional[float] = None
    name: str = "heavy"  # evaluation name of the heavy suite (MLflow tag `evaluation`, run name heavy/step_N)


@dataclass
class WatchConfig:
    dir: Optional[str] = None  # directory (or fsspec URL) that receives checkpoints
    interval: float = 60.0  # seconds between polls
    once: bool = False  # evaluate the backlog, then exit
    plan: list[EvalKind] = field(default_factory=lambda: [EvalKind.loss])  # evaluations per checkpoint: loss, harness
    heavy: HeavyConfig = field(default_factory=HeavyConfig)
    order: WatchOrder = WatchOrder.oldest  # oldest | newest first
    from_step: int = 0  # ignore checkpoints before this step
    max_attempts: int = 3  # per (checkpoint, evaluation), then recorded failed
    backoff_s: float = 30.0  # first retry delay (doubles each attempt)
    stable_s: float = 2.0  # file sizes must be unchanged across two looks this far apart
    state_dir: Optional[str] = None  # ledger + lock; default <watch.dir>/.ckpteval_watch (or outputs/watch/<hash> for URLs)
    lock_stale_s: float = 600.0  # a lock whose heartbeat is older than this is taken over
    max_polls: int = 0  # stop after N polls (0 = forever); for tests and cron-like use
    heartbeat_s: float = 60.0  # lock heartbeat + "heartbeat" log line + summary-run metrics at most this often
    events: bool = True  # also wake on filesystem events (local dirs, through watchdog)
    retry_failed: bool = False  # give checkpoints recorded failed another max_attempts at startup


@dataclass
class SignalConfig:
    """Signal or noise over a series of checkpoints (scans, the watcher, mode=compare): docs/signal.md."""

    last_k: int = 5  # checkpoints per run averaged for signal/METRIC/last_k_mean and noise (capped at the series length)
    select: Optional[str] = None  # metric whose last-k-smoothed value picks the best checkpoint; null: harness/core, else harness/mean_primary, else eval/loss
    register: bool = True  # register the best checkpoint as an MLflow model version with alias `best` (where the store has a registry)
    model_name: Optional[str] = None  # registered model name; default: "<experiment>.best" ("/" and ":" become "-")
    low_snr: float = 2.0  # metrics whose SNR across runs is below this are marked low (table, note, picture)
    max_metrics: int = 16  # metrics shown in the table and the picture (all of them in the CSV)


@dataclass
class CompareConfig:
    """mode=compare: finished evaluation runs read back from MLflow (no model is loaded)."""

    experiments: list[str] = field(default_factory=list)  # experiment names: every finished evaluation run in them
    parents: list[str] = field(default_factory=list)  # scan parent run ids: their evaluation runs
    runs: list[str] = field(default_factory=list)  # evaluation run ids


@dataclass
class UiConfig:
    """mode=ui: the MLflow UI on the configured store."""

    host: str = "127.0.0.1"  # interface to serve on (0.0.0.0: reachable from other machines)
    port: int = 5000  # port of the UI (the View links printed by every mode assume 5000)
    timeout_s: float = 300.0  # how long to wait for the UI to answer before giving up


@dataclass
class CacheConfig:
    """The result store that lets a killed loss/harness job resume where it stopped (docs/resume.md)."""

    enabled: bool = True  # keep each finished batch of results; the same command after a kill computes only the rest
    dir: str = "${paths.outputs}/result_store"  # one store per machine or shared filesystem (SLURM: shared), many jobs at once
    keep: bool = False  # keep a job's results after its run ended FINISHED (default: dropped then)
    max_gb: float = 20.0  # size cap: least recently used entries are evicted beyond it (when a job opens its entry)
    flush_s: float = 2.0  # a kill loses less than this many seconds of finished work (0: every batch written)


@dataclass
class PathsConfig:
    outputs: str = "outputs"  # root of everything we write (Hydra run dirs, MLflow db, demo corpus)
    demo_data: str = "${paths.outputs}/demo_corpus"  # prepared demo corpus (train/, validation/, tokenizer.json)


class CkptFormat(str, Enum):
    """`ckpt_format=`: auto-detect, or force one family of `checkpoint.formats.REGISTRY` (the source of truth;
    tests check the two agree). A str Enum, so resolved configs stay JSON- and MLflow-param-friendly."""

    def __str__(self) -> str:
        return self.value

    auto = "auto"
    hf = "hf"
    dcp = "dcp"
    gguf = "gguf"
    nanogpt = "nanogpt"
    lightning = "lightning"
    torchtitan = "torchtitan"
    megatron = "megatron"
    olmo_core = "olmo_core"
    litgpt = "litgpt"
    fsdp = "fsdp"
    deepspeed = "deepspeed"
    peft = "peft"


@dataclass
class Config:
    mode: ModeConfig = field(default_factory=ModeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    signal: SignalConfig = field(default_factory=SignalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    ui: UiConfig = field(default_factory=UiConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    ckpt: Optional[str] = None  # checkpoint to evaluate: HF dir, DCP dir, .gguf, nanoGPT ckpt.pt, Lightning .ckpt, ... (glob:PATTERN with -m)
    ckpt_format: CkptFormat = CkptFormat.auto  # auto = detect from the path; a family name forces that family
    ckpt_config: Optional[str] = None  # architecture as a config.json (or its dir) for checkpoints saved without one; wins when set
    ckpt_base: Optional[str] = None  # base model of an adapter checkpoint (PEFT); default: the one the adapter names, if local
    tokenizer: Optional[str] = None  # tokenizer override (dir or tokenizer.json); default: from the checkpoint
    seed: int = 1234


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
    from omegaconf import OmegaConf

    from ckpteval.tracking.naming import default_experiment

    # conf/tracking/mlflow.yaml: `experiment: ${ckpteval_experiment:...}`, one experiment per training run
    OmegaConf.register_new_resolver("ckpteval_experiment", default_experiment, replace=True, use_cache=False)
    # conf/harness/offline.yaml: `include_path: ${ckpteval_tasks:}`, the offline tasks shipped in the package
    OmegaConf.register_new_resolver("ckpteval_tasks", _tasks_dir, replace=True)


def _tasks_dir() -> str:
    from ckpteval.tasks import TASKS_DIR

    return str(TASKS_DIR)
