"""The student LLM and its tokenizer: a tiny Qwen3 built from a config (CPU preset) or any HF causal LM.

The tiny preset trains a byte-level BPE tokenizer locally (`tokenizers`) on item text and prompt templates, with
Qwen's chat tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, `<think>`, `</think>`) and a Qwen-style chat
template, then adds one special token per SID code per level plus the SID begin/end markers. GPU presets load a
hub model (e.g. Qwen/Qwen3-8B) and add the same SID tokens with `add_sid_tokens`, resizing the embeddings.

Item text must never turn into a SID or chat token, whatever it contains (a catalogue title can literally read
`<s_a_1>` or `<|im_end|>`): all free text goes through `encode_text`, which tokenises with
`split_special_tokens=True`, so special tokens in text are split into ordinary byte-level pieces. Structural
tokens (chat markers, SIDs) are only ever produced by id lookups (`token_id`, `sid_token_ids`). Every added token of
the tiny tokenizer is registered as special (including `<think>`, which Qwen's own tokenizer leaves non-special)
so that this guarantee covers all of them.

>>> tok = train_tokenizer(["a small red lipstick", "blue nail polish"] * 20, vocab_size=300, sid_levels=2,
...                       codebook_size=4)
>>> sid_token_ids(tok, 2, 4).shape
torch.Size([2, 4])
>>> set(encode_text(tok, "red <s_a_1><|im_end|>")) & set(tok.added_tokens_decoder)
set()
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

import torch
from pydantic import Field, model_validator

from rec.config import Section
from rec.sid.codes import code_token, sid_special_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
CHAT_SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, THINK_START, THINK_END]

# Qwen3's template without tools: `enable_thinking=False` pre-fills an empty think block, as Qwen3 does.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


class ModelSection(Section):
    """Which student to train: a hub id / local path, or (when `name_or_path` is null) a tiny Qwen3 from dims."""

    ADDED_LATER = {"dropout": 0.0}

    name_or_path: str | None = None
    """HF hub id or local directory of a causal LM (GPU presets: Qwen/Qwen3-8B); null builds the tiny model."""
    tokenizer_vocab_size: int = Field(default=8192, ge=300)
    """Tiny preset: byte-level BPE vocabulary trained on item text (chat and SID tokens come on top)."""
    hidden_size: int = Field(default=128, ge=16)
    """Tiny preset: model width."""
    num_layers: int = Field(default=2, ge=1)
    """Tiny preset: decoder layers."""
    num_heads: int = Field(default=2, ge=1)
    """Tiny preset: attention heads (each of `head_dim`)."""
    num_kv_heads: int = Field(default=1, ge=1)
    """Tiny preset: key/value heads (grouped-query attention); must divide num_heads."""
    head_dim: int = 64
    """Tiny preset: per-head width; vLLM's CPU attention needs 64."""
    intermediate_size: int = Field(default=512, ge=16)
    """Tiny preset: MLP width."""
    max_position_embeddings: int = Field(default=2048, ge=64)
    """Tiny preset: longest sequence the rotary embedding is set up for."""
    rope_theta: float = 10000.0
    """Tiny preset: rotary embedding base."""
    tie_word_embeddings: bool = True
    """Tiny preset: share the input embedding and the LM head (most of a tiny model's parameters)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Training-only dropout on the token embeddings and on every decoder layer's attention and MLP outputs before
    they join the residual stream (`add_training_dropout`): a regulariser for small models on sparse sequences
    (SASRec-style). Forward hooks, not the model config: the published model, SFT, RL and every engine over it run
    without it (Qwen3 has no residual dropout of its own)."""

    @model_validator(mode="after")
    def _check_heads(self) -> ModelSection:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        return self


def _added(content: str):
    from tokenizers import AddedToken

    # normalized=False: match the literal string; special=True: `split_special_tokens` applies to it.
    return AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    sid_levels: int | None = None,
    codebook_size: int | None = None,
    min_frequency: int = 2,
) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer on `texts`; add chat tokens, a chat template and (optionally) SID tokens.

    `vocab_size` counts the BPE vocabulary including the chat tokens; SID tokens are added on top of it.
    Deterministic: the same texts give the same tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[_added(t) for t in CHAT_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=1 << 20,
    )
    tokenizer.add_tokens([_added(t) for t in CHAT_SPECIAL_TOKENS], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    if sid_levels is not None:
        if codebook_size is None:
            raise ValueError("train_tokenizer: sid_levels given without codebook_size")
        add_sid_tokens(tokenizer, None, sid_levels, codebook_size)
    return tokenizer


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of free text (item text, prompts); never a special token, whatever the text contains."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """`encode_text` for a batch (one call into the Rust tokenizer)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """Id of one added token (chat marker, SID token); an error if the tokenizer lacks it."""
    found = tokenizer.get_vocab().get(token)
    if found is None:
        raise KeyError(f"token {token!r} is not in the tokenizer; add the SID tokens first (add_sid_tokens)")
    return int(found)


def add_sid_tokens(
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel | None,
    levels: int,
    codebook_size: int,
) -> int:
    """Add the SID tokens (begin/end + one per code per level) as special tokens; fit `model`'s embeddings to them.

    Tokens already present are kept (idempotent). The rows of the new tokens start as transformers' `mean_resizing`
    starts added rows (`init_new_token_rows`), also where the model already had spare rows: hub models pad their
    embedding (Qwen3-8B: 151,936 rows for 151,669 tokens), and rows no token ever used hold untrained values.
    Returns the number of tokens added.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in sid_special_tokens(levels, codebook_size) if t not in vocab]
    first_new = len(tokenizer)
    added = tokenizer.add_tokens([_added(t) for t in missing], special_tokens=True) if missing else 0
    if model is not None and added:
        fit_embeddings(model, len(tokenizer), first_new)
    return added


def fit_embeddings(model: PreTrainedModel, num_tokens: int, first_new: int) -> None:
    """Grow `model`'s embeddings to `num_tokens` rows when they are smaller, then initialise rows `first_new ..
    num_tokens` (the added tokens) from the rows before them, whether those rows were just created or were spare."""
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # a ZeRO-3 partitioned parameter's shape is empty
    if rows < num_tokens:
        # no mean_resizing here: init_new_token_rows draws every added row the same way just below, so transformers'
        # own draw (a covariance over the whole vocabulary) would be computed and then overwritten
        model.resize_token_embeddings(num_tokens, mean_resizing=False)
    init_new_token_rows(model, min(first_new, rows), num_tokens)


def first_sid_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The lowest id of a SID token in `tokenizer` (the SID tokens are added as one block), None when it has none."""
    from rec.sid.codes import SID_BEGIN, SID_END

    ids = [i for token, i in tokenizer.get_added_vocab().items()
           if token in (SID_BEGIN, SID_END) or (token.startswith("<s_") and token.endswith(">"))]
    return min(ids) if ids else None


@torch.no_grad()
def init_new_token_rows(model: PreTrainedModel, first_new: int, end: int, seed: int = 0) -> None:
    """Rows `first_new .. end` of the input embeddings (and of an untied LM head) drawn as transformers'
    `mean_resizing` draws added rows: from a normal around the mean of rows `0 .. first_new` with 1e-9 x their
    covariance (the mean itself when that covariance is not positive definite)."""
    if end <= first_new:
        return
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not matrices[0]:
        matrices.append(head.weight)
    generator = torch.Generator().manual_seed(seed)
    for weight in matrices:
        if hasattr(weight, "ds_id"):  # a ZeRO-3 partitioned parameter: gather it, change it on rank 0, re-partition
            import deepspeed

            with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
                _draw_rows(weight, first_new, end, generator)
        else:
            _draw_rows(weight, first_new, end, generator)


@torch.no_grad()
def _draw_rows(weight: torch.Tensor, first_new: int, end: int, generator: torch.Generator) -> None:
    old = weight[:first_new].to(torch.float32)
    mean = old.mean(dim=0)
    centred = old - mean
    covariance = 1e-9 * (centred.T @ centred) / first_new
    try:
        factor = torch.linalg.cholesky(covariance)
        noise = torch.randn(end - first_new, mean.shape[0], generator=generator).to(mean.device)
        rows = mean + noise @ factor.T
    except RuntimeError:  # not positive definite
        rows = mean.expand(end - first_new, -1)
    weight[first_new:end] = rows.to(weight.dtype)


SID_SOFTMAX = ("vocab", "level")


def check_sid_softmax(value: str) -> str:
    if value not in SID_SOFTMAX:
        raise ValueError(f"sid_softmax must be one of {SID_SOFTMAX}, not {value!r}")
    return value


def sid_softmax_of(config) -> str:
    """How a model scores SID codes (`pipelines.midtrain` writes it into config.json): `vocab` (the full vocabulary;
    models without the field, e.g. a hub model) or `level` (each level's codes among themselves)."""
    return check_sid_softmax(getattr(config, "sid_softmax", None) or "vocab")


class SidCodeTables(NamedTuple):
    """A SID vocabulary's code tokens as lookup tables: `ids` [levels, codebook_size] token ids (`sid_token_ids`),
    and per token id of the vocabulary its `level` and its `code` within the level (-1 for tokens that are not codes)."""

    ids: torch.Tensor
    level: torch.Tensor
    code: torch.Tensor

    @classmethod
    def of(cls, ids: torch.Tensor, vocab_size: int) -> SidCodeTables:
        ids = ids.long()
        levels, codebook_size = ids.shape
        level = torch.full((vocab_size,), -1, dtype=torch.long)
        code = torch.full((vocab_size,), -1, dtype=torch.long)
        code[ids.flatten()] = torch.arange(codebook_size).repeat(levels)
        level[ids.flatten()] = torch.arange(levels).repeat_interleave(codebook_size)
        return cls(ids, level, code)

    def to(self, device) -> SidCodeTables:
        return SidCodeTables(*(t.to(device) for t in self))


def sid_token_ids(tokenizer: PreTrainedTokenizerBase, levels: int, codebook_size: int) -> torch.Tensor:
    """LongTensor [levels, codebook_size]: the token id of code `c` at level `l` (for trie-constrained decoding)."""
    tokens = [code_token(level, code) for level in range(levels) for code in range(codebook_size)]
    vocab = tokenizer.get_vocab()
    missing = [token for token in tokens if token not in vocab]
    if missing:
        raise KeyError(f"SID tokens {missing[:3]}... are not in the tokenizer; call add_sid_tokens first")
    ids = [vocab[token] for token in tokens]
    return torch.tensor(ids, dtype=torch.long).view(levels, codebook_size)


def build_tiny_model(cfg: ModelSection, vocab_size: int, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised Qwen3ForCausalLM with the dims of `cfg` and `vocab_size` rows (= len(tokenizer))."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        dtype="float32",
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def add_training_dropout(model: PreTrainedModel, p: float) -> list:
    """Dropout with probability `p` on the output of the input embedding and of each decoder layer's `self_attn` and
    `mlp` (residual dropout), active only while the module is in training mode; returns the hook handles.

    Hooks rather than config fields so that nothing of it is saved: a checkpoint loads and runs exactly as without.
    Needs a decoder with `layers[i].self_attn` / `.mlp` (Qwen3, Llama, Qwen2 and most HF causal LMs).
    """
    if p <= 0:
        return []
    import torch.nn.functional as F

    def on_tensor(module, args, output):
        return F.dropout(output, p, module.training)

    def on_attention(module, args, output):  # (attn_output, attn_weights)
        return (F.dropout(output[0], p, module.training), *output[1:])

    decoder = model.get_decoder()
    handles = [model.get_input_embeddings().register_forward_hook(on_tensor)]
    for layer in decoder.layers:
        handles.append(layer.self_attn.register_forward_hook(on_attention))
        handles.append(layer.mlp.register_forward_hook(on_tensor))
    return handles


def configure_special_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Point the model's pad/eos ids at the tokenizer's, and stop generation at `<|im_end|>` or `<|endoftext|>`."""
    from transformers import GenerationConfig

    eos = [token_id(tokenizer, t) for t in (IM_END, ENDOFTEXT) if t in tokenizer.get_vocab()]
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(
        eos_token_id=eos or tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )


def load_student(name_or_path: str, dtype: torch.dtype | str = "auto") -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and causal LM from a hub id or a local directory (a trained checkpoint or e.g. Qwen/Qwen3-8B)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except OSError as err:
        raise OSError(
            f"cannot load the student {name_or_path!r}: {err}. Give a local checkpoint directory, or a hub id "
            "already in the HF cache (nothing is downloaded on the tiny preset)"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embedding and LM head counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def logits_at_labels(model, labels: torch.Tensor, **inputs):
    """(logits [K, vocab], targets [K], mask [batch, len - 1]) of the K positions whose next token is a label (not
    -100): the base model's hidden states there go through `lm_head`, the other positions' never do. The head is
    most of a small model's compute (hidden 128 x a ~9k vocabulary), and SFT prompts or history tokens are not
    labels, so this is what the training losses use (ZeRO stages 0-2; ZeRO-3 gathers parameters in the DeepSpeed
    engine's forward and takes the full HF forward). With no label at all: (None, a zero loss that still reaches
    every parameter, the empty mask). `model` is a HF causal LM with `.model` and `.lm_head`."""
    hidden = model.model(**inputs).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    if not bool(keep.any()):
        return None, hidden.sum() * 0.0, keep
    return model.lm_head(hidden[:, :-1][keep]), targets[keep], keep
