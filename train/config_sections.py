"""The sections of a run's configuration, one dataclass each; every field's docstring is its entry in
the configuration reference (`python -m train.config_reference`). Loading, checking and overrides are in
`train/config.py`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    corpus: str = "stdlib"
    """`stdlib` (the Python standard library's `.py` sources, found at run time) or a path to a text file
    or a folder of text files (recursive; binary, empty and hidden files skipped)."""
    tokenizer: str | None = None
    """A `tokenizer.json` (any; its `tokenizer_config.json` alongside is read for the end and begin
    tokens). Null: with `model.pretrained` the folder's own `tokenizer.json` (an error when it has none),
    else a byte-level BPE trained on the corpus and cached."""
    eos_token: str | None = None
    """The token appended after every document (its text, e.g. `<|endoftext|>`); null: the tokenizer
    config's `eos_token`, else the pretrained model's `eos_token_id`, else `<|endoftext|>`."""
    vocab_size: int = 2048
    """Size of the trained tokenizer, in tokens (>= 257: 256 bytes + `<|endoftext|>`); unused with
    `data.tokenizer`."""
    seq_len: int = 128
    """Training sequence length, in tokens (>= 1); at most `model.max_seq_len`."""
    cache_dir: str = ".cache/mla-parallel"
    """Folder of the tokenizer and the memory-mapped token files (`train.bin`, `val.bin` + JSON sidecars);
    shared by every rank."""
    max_corpus_mb: float | None = None
    """Cap on the bytes of the corpus read, in MiB (> 0; null: everything, except `stdlib`, which keeps
    4 MiB); the last file is cut short."""
    val_fraction: float = 0.05
    """Fraction of the documents held out for validation, spread over the corpus and never trained on;
    in (0, 0.5]. When those documents would hold less than half or more than twice this share of the
    bytes (few or uneven documents), the last `val_fraction` of the tokens instead; the log says which."""
    encoding_errors: str = "strict"
    """Corpus bytes that are not UTF-8: `strict` (an error naming the file) or `replace` (read as U+FFFD;
    the log counts the files)."""
    format: str = "auto"
    """How corpus files are read: `text` (a file is a document), `jsonl` (a JSON object per line, the
    document in `data.text_field`), `chat` (`messages: [{role, content}]`, loss on assistant turns only),
    `instruction` (`data.prompt_field` + `data.completion_field`, loss on the completion only); `auto`:
    `.jsonl`/`.json` files are `jsonl`, others `text`."""
    text_field: str = "text"
    """The JSON field holding a `jsonl` record's document."""
    prompt_field: str = "prompt"
    """The JSON field holding an `instruction` record's prompt (not trained on)."""
    completion_field: str = "completion"
    """The JSON field holding an `instruction` record's completion (trained on)."""
    chat_template: str | None = None
    """A `.jinja` chat template file, or `builtin`; null: the tokenizer folder's `tokenizer_config.json`
    `chat_template` if any, else the built-in one (docs/data.md)."""
    on_bad_record: str = "error"
    """A malformed JSONL line: `error` (stop, naming file and line) or `skip` (count it in the log)."""
    packing: bool = True
    """Concatenate documents into `seq_len` windows; false: one document per row, truncated or padded
    (padding ignored by the loss)."""
    document_masking: bool | None = None
    """Attention never crosses a document boundary and RoPE positions restart per document; null: on
    for record formats (`jsonl`, `chat`, `instruction`) and mixtures, off for plain `text` corpora (whose
    random windows are then as before)."""
    mixture: list[dict[str, Any]] | None = None
    """Sources drawn from in proportion to their weight: a list of `{corpus, format, weight}` (format
    optional, default `data.format`); replaces `data.corpus`. The tokenizer is the first source's."""
    val_corpus: str | None = None
    """A separate validation corpus (same format rules); null: held-out documents of each source."""
    num_workers: int = 0
    """Processes that tokenize record corpora (0: in the building process; `tokenizers` itself also uses
    threads)."""


@dataclass
class DistributedConfig:
    backend: str = "auto"
    """`auto` (nccl with CUDA, else gloo), `gloo` or `nccl`."""
    dp: int | None = None
    """Data-parallel size (>= 1; null: world size / (tp x pp x cp))."""
    tp: int | None = None
    """Tensor-parallel size (>= 1; null: 1); must divide `model.num_heads` and `model.intermediate_size`."""
    pp: int = 1
    """Pipeline stages (>= 1)."""
    cp: int = 1
    """Context-parallel size (>= 1): each sequence split over this many ranks, in 2 cp zigzag pieces
    (`data.seq_len` divisible by 2 cp; not with MoE layers or dropout); see docs/long-context.md."""
    ep: int = 1
    """Expert-parallel size (>= 1; divides dp): the routed experts split over this many of the data-parallel
    ranks (see the MoE guide)."""
    zero_stage: int = 0
    """0 (plain data parallel), 1 (optimizer state + fp32 master weights sharded over dp), 2 (+ gradients),
    3 (+ parameters)."""
    sequence_parallel: bool = False
    """Split norms, residuals and dropout along the sequence over the TP ranks (needs `data.seq_len`
    divisible by tp); see the memory guide."""
    pp_schedule: str = "1f1b"
    """`gpipe`, `1f1b`, `interleaved_1f1b` (needs `virtual_stages >= 2` and micro-batches a multiple of
    pp) or `zb1p` (ZB-H1 zero-bubble)."""
    num_microbatches: int | None = None
    """Micro-batches per step and dp rank (>= 1; null: from `train.micro_batch_size`)."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (>= 1; interleaved 1F1B)."""
    pp_layers: list[int] | None = None
    """Decoder layers per (virtual) stage, e.g. `[3, 5]` (each >= 1; null: a balanced split)."""
    offload_optimizer: bool = False
    """Keep fp32 master weights and optimizer state in (pinned) CPU memory and run the step on the CPU."""
    recompute: str = "none"
    """Activation recompute: `none`, `full` (recompute each decoder layer in backward) or `selective`
    (recompute only the attention core); `true`/`false` mean `full`/`none`. The old name
    `distributed.activation_checkpointing` is a deprecated alias that still works."""
    bucket_cap_mb: float = 25.0
    """Data-parallel gradient bucket size, in MiB (> 0)."""
    timeout_s: float = 600.0
    """Collective timeout once the first step is done, in seconds (> 0, finite): a lost rank fails the job
    instead of hanging it."""
    startup_timeout_s: float = 1800.0
    """Collective timeout until the first step is done (data building, loading), in seconds (>=
    `distributed.timeout_s`), honoured as given."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """`adamw`, or `adamw8bit` (`parallel.AdamW8bit`: the same hyper-parameters, moments in 8 bits)."""
    lr: float = 3e-3
    """Peak learning rate (> 0), reached at the end of warmup."""
    min_lr: float = 3e-4
    """Final learning rate of the decaying schedules (>= 0, <= `optim.lr`)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's two moment decay rates, each in [0, 1)."""
    eps: float = 1e-8
    """AdamW's epsilon (> 0)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (>= 0); none on norms."""
    warmup_steps: int = 20
    """Steps of linear warmup to `optim.lr` (>= 0)."""
    schedule: str = "cosine"
    """Learning rate after warmup: `cosine`, `linear`, `constant` or `wsd` (warmup-stable-decay); see
    `train/schedules.py`."""
    decay_fraction: float = 0.2
    """`wsd`: the last fraction of `train.steps` that decays linearly to `optim.min_lr`; in [0, 1]."""


@dataclass
class TrainConfig:
    global_batch_size: int = 16
    """Sequences per optimizer step, whatever the layout (>= 1)."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward on one rank (>= 1, <= `train.global_batch_size`; null: global / dp,
    no accumulation)."""
    steps: int = 200
    """Optimizer steps (>= 1)."""
    precision: str = "fp32"
    """`fp32`; `bf16`, `fp16`: 16-bit weights and activations, fp32 master weights and gradient
    accumulation in the optimizer; `fp16` adds dynamic loss scaling (`loss_scale`, `skipped_steps` in the
    metrics)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (>= 0; 0: off)."""
    seed: int = 1234
    """Seed of the weights and the data order (>= 0)."""
    log_every: int = 10
    """Steps between progress lines and `metrics.jsonl` records (>= 1)."""
    eval_every: int = 50
    """Steps between validations (>= 0; 0: only before and after training)."""
    eval_batches: int = 8
    """Validation size, in global batches of windows (>= 1; layout-independent)."""
    save_every: int = 0
    """Steps between checkpoints into `checkpoints/step-NNNNNNNN/` (>= 0; 0: only at the end and on
    SIGTERM)."""
    out_dir: str = "runs/default"
    """Folder the run writes its files into."""
    resume: str = "never"
    """`never`; `auto`: the newest complete, checksum-valid checkpoint of `out_dir` (none: start afresh);
    or a checkpoint folder or run folder. A fresh run (`never`) into a folder that holds a run is refused
    unless `train.overwrite` is set."""
    overwrite: bool = False
    """With `train.resume=never`, move the files of a run already in `out_dir` aside to
    `<out_dir>.replaced-<time>/` (never deleted) instead of refusing to start."""
    keep_last: int = 3
    """Checkpoints kept (>= 2)."""
    on_nonfinite: str = "raise"
    """A NaN/inf loss or gradient norm: `raise` (stop, naming the step) or `skip` (no update; counted)."""
    max_skipped_steps: int = 10
    """`on_nonfinite=skip`: the run stops with an error when more than this many steps in a row are
    skipped, or more than 5% of `train.steps` (and at least this many) in all (>= 0)."""
    sample_tokens: int = 48
    """Tokens of the sample generated at the end (>= 0; 0: none)."""
    sample_prompt: str = "def "
    """Prompt of the sample generated at the end."""
    curriculum_start_seq_len: int | None = None
    """Sequence-length warm-up: the first length, in tokens (>= 1; null: off); with constant tokens a
    divisor of `data.seq_len`."""
    curriculum_steps: int = 0
    """Steps over which the length grows to `data.seq_len` (>= 0; >= 1 when the curriculum is on)."""
    curriculum_constant_tokens: bool = True
    """B x L / L_k sequences of length L_k per step (false: B sequences, fewer tokens early)."""
    max_loss: float | None = None
    """Stop the run when a logged training loss is NaN/inf or above this (> 0; null: never); sweeps set
    it."""
    mem_warn_fraction: float = 0.9
    """Log a warning when memory in use (the device's on GPU, the host's on CPU) exceeds this fraction; in
    (0, 1]."""
    compile: bool = False
    """`torch.compile` each decoder layer's forward (hooks stay eager)."""
    compile_backend: str = "inductor"
    """torch.compile backend: `inductor`, or `eager`/`aot_eager` (check tracing only)."""
    peak_tflops: float | None = None
    """Per-device dense 16-bit peak for MFU, in TFLOP/s (> 0; null: the detected GPU preset's, no MFU on
    CPU)."""
    async_save: bool = False
    """Write checkpoints in a background thread; the step waits only for the copy to host memory."""
    wandb: dict[str, str] | None = None
    """W&B tracking (rank 0): {project, name, entity, mode: online|offline|disabled}; id kept on resume."""
    tensorboard: bool = False
    """TensorBoard event files of every metrics record under `out_dir/tensorboard/` (rank 0)."""
    profile_steps: list[int] | None = None
    """`[first, last]` steps (1-based) traced by torch.profiler into `out_dir/profile/`; null: off."""
    time_breakdown: bool = True
    """Step-time breakdown (`time_*_s`) in the metrics; on CUDA it syncs the device at the phase
    boundaries of each window's logged step."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters only (every other weight frozen); writes `adapter/` (PEFT layout) and the merged
    model in `final/`."""
    r: int = 8
    """Adapter rank (>= 1)."""
    alpha: float = 16.0
    """Adapter scale numerator (> 0): the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input; in [0, 1)."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "q_b_proj", "kv_b_proj", "o_proj"])
    """Linear layers to adapt, by PEFT's rule: a list matches module names equal to or ending in `.` + an
    entry; a single string is a regular expression over the whole name."""
    quantize_base: str | None = None
    """null, or `nf4`: the targeted weights become frozen 4-bit NormalFloat with double quantization
    (QLoRA), each rank quantizing its own TP shard."""


@dataclass
class Config:
    """A whole run. `model` holds only the keys the user set (MLAConfig fields and `pretrained`)."""

    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
