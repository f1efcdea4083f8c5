"""Shared shape of the Titans paper-scale configs (340m.py, 760m.py).

Training recipe of Titans section 5.1 / NL_MATH.md section 6: Llama-2
tokenizer (32K vocabulary), 4K training length, AdamW lr 4e-4 with cosine
decay, weight decay 0.1, 0.5M-token batches (128 x 4096).
"""

from experiments import base


def paper_config(d_model: int, n_layers: int, n_heads: int, d_ff: int, mixer: str):
    c = base.get_config()
    c.model.mixer = mixer
    c.model.mlp = "swiglu"
    c.model.vocab_size = 32000          # Llama-2 tokenizer
    c.model.d_model = d_model
    c.model.n_layers = n_layers
    c.model.n_heads = n_heads
    c.model.d_ff = d_ff
    c.model.tie_embeddings = True
    c.model.dtype = "bfloat16"
    c.model.memory = dict(
        kind="mlp",            # deep memory, L_M = 2 (Titans section 3 / 5.1)
        objective="l2",
        momentum=True,
        weight_decay=True,
        dgd=False,
        mlp_depth=2,
        mlp_expansion=4,       # hidden width 4 x head_dim (project choice)
        chunk_size=64,         # inner mini-batch size (project choice; divides 4096)
        path="chunked",
        remat_every=1,
        segment_len=512,       # MAC segment length (project choice; divides 4096)
        n_persistent=4,        # persistent memory tokens (project choice)
        window=512,            # MAG/MAL sliding window (project choice)
    )
    c.data.tokenizer = dict(
        kind="sentencepiece",
        # The Llama-2 tokenizer.model is not bundled: pass its path with
        # --config.data.tokenizer.path=/path/to/llama2/tokenizer.model
        path="tokenizers/llama2/tokenizer.model",
    )
    c.data.train_files = ("data/fineweb_edu/train/*.txt",)
    c.data.eval_files = ("data/fineweb_edu/heldout/*.txt",)
    c.data.seq_len = 4096
    c.data.batch_size = 128              # 128 x 4096 = 0.5M tokens per step
    c.train.steps = 30_000_000_000 // (128 * 4096)   # 30B tokens (Titans 760M budget)
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.levels.default.optimizer.learning_rate = 4e-4
    c.levels.default.optimizer.b2 = 0.95
    c.levels.default.optimizer.weight_decay = 0.1
    c.levels.default.optimizer.schedule = dict(name="warmup_cosine", warmup_steps=2000,
                                               end_factor=0.1)
    return c
