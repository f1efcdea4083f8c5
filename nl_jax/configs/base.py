"""Base config: every run is this plus a model/levels change plus overrides.

It also lists every key a config file may set at the top level and in the
groups ``train``, ``data``, ``model``, ``teach_signal``, ``mesh``, ``sharding``
(``nl_jax.config.check_known_keys``).  Config files start from it with
``from nl_jax.configs import base``; ``experiments/base.py`` re-exports it for
config files written before it moved here.

Keys that scripts rely on and that stay stable: train.steps, train.seed,
data.seq_len, data.batch_size.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.train = dict(
        steps=300,              # optimizer steps
        seed=0,
        log_every=10,           # metrics to JSONL / TensorBoard every N steps
        eval_every=100,         # held-out evaluation every N steps (0: only at the end)
        eval_batches=4,
        checkpoint_every=100,   # async orbax save every N steps (and at the end)
        keep_checkpoints=3,
        grad_clip_norm=1.0,     # global-norm clipping before every level (0: off)
        sample_tokens=64,       # length of the text sample printed at the end
        # Weights & Biases (pip install 'nl_jax[wandb]'): the metrics.jsonl records
        # and the resolved config, from process 0.  mode "offline" writes the run
        # under WORKDIR/wandb/ (or $WANDB_DIR) for a later `wandb sync`; "online"
        # needs `wandb login`.  Empty entity / name: W&B's defaults.
        wandb=dict(enabled=False, project="nl_jax", entity="", mode="offline", name=""),
    )

    c.data = dict(
        # Relative paths start at the folder that holds the nl_jax package (the
        # repository, or site-packages when installed), so the bundled corpus
        # and tokenizer are found either way; absolute paths are used as they are.
        train_files=("nl_jax/data/assets/corpus/train/*.txt",),
        eval_files=("nl_jax/data/assets/corpus/heldout/*.txt",),
        tokenizer=dict(kind="bpe_json", path="nl_jax/data/assets/tokenizer/bpe_2k.json"),
        cache_dir="runs/token_cache",
        # A folder made by `python -m nl_jax data prepare` (token shards + manifest.json):
        # when set, training reads it instead of train_files (its tokenizer must be
        # data.tokenizer); "" = train on train_files.  Evaluation reads eval_files.
        prepared="",
        seq_len=128,
        batch_size=16,
    )

    c.model = dict(
        mixer="attention",      # see nl_jax/models/lm.py for the choices
        mlp="swiglu",
        vocab_size=2048,        # must equal the tokenizer's vocabulary size
        d_model=128,
        n_layers=2,
        n_heads=4,
        d_ff=384,
        tie_embeddings=True,
        rope_theta=10000.0,
        attention_window=0,     # 0: full causal attention
        norm_eps=1e-6,
        init_std=0.02,
        dtype="float32",        # compute dtype; parameters stay float32
        remat=False,            # recompute each block in the backward pass (memory)
    )

    # Outer levels (step clock): regex over parameter paths -> optimizer.
    c.levels = dict(
        default=dict(
            params=".*",
            every=1,
            optimizer=dict(
                name="adamw", learning_rate=3e-3, b1=0.9, b2=0.95,
                weight_decay=0.1,
                schedule=dict(name="warmup_cosine", warmup_steps=30, end_factor=0.1),
            ),
        ),
    )

    # Task-loss teach signal (nl_jax/train/teach.py): weights whose path matches
    # `params` (e.g. a frozen CMS level) take one SGD step on the LM loss of every
    # `segment`-token segment, per sequence, in training and eval.  '' = off.
    c.teach_signal = dict(params="", segment=0, lr=0.0, max_update=0.0)

    # Mesh: -1 fills with the remaining devices.
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.sharding = dict(rules=(
        ("batch", ("data", "fsdp")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("memory_heads", "tensor"),
        ("memory_state", "fsdp"),
    ))
    return c


def paper_recipe(c: ml_collections.ConfigDict, train_tokens: int) -> ml_collections.ConfigDict:
    """The Titans / NL training recipe (docs/equations.md section 6) for paper-scale configs.

    Llama-2 tokenizer (32K vocabulary; not bundled, Meta's licence: pass
    --config.data.tokenizer.path=/path/to/tokenizer.model), 4K training
    length, 0.5M-token batches (128 x 4096), AdamW lr 4e-4 with warmup + cosine,
    weight decay 0.1, bf16 compute.  Data paths are placeholders for the
    user's FineWeb-Edu shards (text files).
    """
    c.model.vocab_size = 32000
    c.model.tie_embeddings = True
    c.model.dtype = "bfloat16"
    # c.model.remat = True: -72% step memory for +28% FLOPs (Titans 340M MAG,
    # 4K, v5p; docs/design.md); off by default since 340M fits without it.
    c.data.tokenizer = dict(kind="sentencepiece", path="tokenizers/llama2/tokenizer.model")
    c.data.train_files = ("data/fineweb_edu/train/*.txt",)
    c.data.eval_files = ("data/fineweb_edu/heldout/*.txt",)
    c.data.seq_len = 4096
    c.data.batch_size = 128
    c.train.steps = train_tokens // (c.data.batch_size * c.data.seq_len)
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    opt = c.levels.default.optimizer
    opt.learning_rate = 4e-4
    opt.b2 = 0.95
    opt.weight_decay = 0.1
    opt.schedule = dict(name="warmup_cosine", warmup_steps=2000, end_factor=0.1)
    return c
