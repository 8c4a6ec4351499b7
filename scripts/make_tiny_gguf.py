#!/usr/bin/env python3
"""Write a tiny but valid llama-architecture GGUF model, for the real-engine test tier (and, with
size options, larger ones of the same kind for the estimate and swap benchmarks).

A real ``llama-server`` loads it in well under a second on one CPU core, so the tier exercises
real presets, cold starts, streaming, embeddings and crashes without downloading weights. The
weights are built by hand so that the model is deterministic: whatever the prompt, its greedy
answer is ``ANSWER`` and then end-of-sequence (finish_reason "stop"; "length" when max_tokens
cuts it short).

How: every token's embedding is one-hot. Each token of the answer owns one dimension, all other
tokens share dimension 0; ``output.weight`` maps the dimension of the current token to a large
logit for the next token of the answer (dimension 0 leads to the answer's first token, its last
token leads to EOS). Attention and feed-forward weights are tiny noise: the matrix products
really run but cannot change the outcome. The unused dimensions carry small random features so
that ``/v1/embeddings`` (mean pooling) gives different vectors for different texts.

The size options (``--dim``, ``--blocks``, ``--ff``, ``--heads``, ``--kv-heads``, ``--vocab``,
``--ctx``, ``--f16``) make a model of any shape that still answers ``ANSWER`` (the noise stays
too small to matter; extra vocabulary entries are unused tokens): a GiB-sized file with random
weights for benchmarks that measure loading and memory, not quality. Tensors are written one at
a time, so a large model never sits whole in memory.

    python scripts/make_tiny_gguf.py OUT.gguf       # needs numpy and gguf (pip install -e '.[real]')
    python scripts/make_tiny_gguf.py OUT.gguf --dim 2048 --blocks 10 --ff 5632 --heads 16 \
        --vocab 32000 --f16                        # 1.2 GiB
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import numpy as np
from gguf import GGUFWriter, PoolingType, TokenType

ANSWER = "Hello! This is a tiny test model speaking."
# The answer as SentencePiece pieces ("\u2581" marks the start of a word), in order.
ANSWER_PIECES = ["Hello", "!", "\u2581This", "\u2581is", "\u2581a", "\u2581tiny", "\u2581test", "\u2581model",
                 "\u2581speaking", "."]
WORDS = ["\u2581the", "\u2581hello", "\u2581Hello", "\u2581you", "\u2581say", "\u2581world", "he", "ll", "llo",
         "ello", "Th", "This", "is", "in", "te", "od", "el", "ea", "ing"]

@dataclass(frozen=True)
class Shape:
    """The model's dimensions: the defaults are the tiny test model (2 blocks, 0.5 MB)."""

    dim: int = 64
    heads: int = 4
    kv_heads: int = 0  # 0: as many as heads (grouped-query attention when fewer)
    ff: int = 128
    blocks: int = 2
    ctx: int = 32768  # the training context; RoPE: a long context costs only KV memory when used
    vocab: int = 0  # 0: the hand-made vocabulary alone (about 400 tokens)
    f16: bool = False  # the matrices in f16 (norms stay f32, as llama.cpp's converters write them)



def shape_of_size(mib: int) -> Shape:
    """A 2048-wide f16 model of about ``mib`` MiB (at least one block): for benchmarks that need
    a file of a given size that a real llama-server loads and answers with."""
    base = Shape(dim=2048, heads=16, ff=5632, vocab=32000, f16=True)
    edges = 2 * base.vocab * base.dim * 2  # token_embd and output, f16
    per_block = (4 * base.dim * base.dim + 3 * base.ff * base.dim) * 2
    return replace(base, blocks=max(1, -(-(mib * 2**20 - edges) // per_block)))

CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")


def vocabulary(size: int = 0) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style: control tokens, the 256 byte-fallback tokens, single characters,
    then whole pieces (a higher score merges first); padded with unused tokens to ``size``."""
    pieces: dict[str, tuple[float, int]] = {}
    for special in ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"):
        pieces[special] = (0.0, TokenType.UNKNOWN if special == "<unk>" else TokenType.CONTROL)
    for byte in range(256):
        pieces[f"<0x{byte:02X}>"] = (0.0, TokenType.BYTE)
    pieces["\u2581"] = (-1.0, TokenType.NORMAL)
    for code in range(0x21, 0x7F):
        pieces.setdefault(chr(code), (-2.0, TokenType.NORMAL))
    for rank, piece in enumerate([*ANSWER_PIECES, *WORDS]):
        pieces.setdefault(piece, (10.0 - 0.1 * rank, TokenType.NORMAL))
    for extra in range(len(pieces), size):  # never produced by the tokenizer nor by the answer
        pieces[f"<unused_{extra}>"] = (-1000.0, TokenType.UNUSED)
    names = list(pieces)
    return names, [pieces[n][0] for n in names], [int(pieces[n][1]) for n in names]


def write(path: str, seed: int = 7, shape: Shape = Shape()) -> None:
    rng = np.random.default_rng(seed)
    tokens, scores, types = vocabulary(shape.vocab)
    index = {t: i for i, t in enumerate(tokens)}
    chain = [index[p] for p in ANSWER_PIECES]
    eos = index["</s>"]
    dim, head = shape.dim, shape.dim // shape.heads
    kv_dim = (shape.kv_heads or shape.heads) * head
    assert len(chain) < dim and dim % shape.heads == 0
    matrix = np.float16 if shape.f16 else np.float32

    def embeddings() -> np.ndarray:
        dim_of = {token: k + 1 for k, token in enumerate(chain)}  # dimension 0: every other token
        out = np.zeros((len(tokens), dim), dtype=np.float32)
        out[np.arange(len(tokens)), [dim_of.get(t, 0) for t in range(len(tokens))]] = 1.0
        free = len(chain) + 1
        out[:, free:] = rng.normal(0.0, 0.1, (len(tokens), dim - free))
        return out.astype(matrix)

    def output() -> np.ndarray:
        # After RMS norm the one-hot dimension is about 6.5 (more for a larger dim): a weight of 5
        # gives the next token of the answer a logit above 32, every other token about 0.
        out = np.zeros((len(tokens), dim), dtype=matrix)
        out[chain[0], 0] = 5.0
        for k, (token, successor) in enumerate(zip(chain, [*chain[1:], eos])):
            out[successor, k + 1] = 5.0
        return out

    def noise(*dims: int) -> Callable[[], np.ndarray]:
        # uniform, |w| <= 1e-3: fast to draw for GiB-sized models, and too small to change the answer
        return lambda: ((rng.random(dims, dtype=np.float32) - 0.5) * 2e-3).astype(matrix)

    def ones() -> np.ndarray:
        return np.ones(dim, dtype=np.float32)

    # numpy shapes are (rows, columns): the reverse of ggml's ne.
    plan: list[tuple[str, tuple[int, ...], type, Callable[[], np.ndarray]]] = [
        ("token_embd.weight", (len(tokens), dim), matrix, embeddings)]
    for block in range(shape.blocks):
        name = f"blk.{block}."
        plan += [(name + "attn_norm.weight", (dim,), np.float32, ones),
                 (name + "attn_q.weight", (dim, dim), matrix, noise(dim, dim)),
                 (name + "attn_k.weight", (kv_dim, dim), matrix, noise(kv_dim, dim)),
                 (name + "attn_v.weight", (kv_dim, dim), matrix, noise(kv_dim, dim)),
                 (name + "attn_output.weight", (dim, dim), matrix, noise(dim, dim)),
                 (name + "ffn_norm.weight", (dim,), np.float32, ones),
                 (name + "ffn_gate.weight", (shape.ff, dim), matrix, noise(shape.ff, dim)),
                 (name + "ffn_up.weight", (shape.ff, dim), matrix, noise(shape.ff, dim)),
                 (name + "ffn_down.weight", (dim, shape.ff), matrix, noise(dim, shape.ff))]
    plan += [("output_norm.weight", (dim,), np.float32, ones), ("output.weight", (len(tokens), dim), matrix, output)]

    w = GGUFWriter(path, "llama")
    w.add_name("llm-router tiny test model")
    w.add_context_length(shape.ctx)
    w.add_embedding_length(dim)
    w.add_block_count(shape.blocks)
    w.add_feed_forward_length(shape.ff)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads or shape.heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_file_type(1 if shape.f16 else 0)  # 1: mostly f16, 0: all f32
    w.add_pooling_type(PoolingType.MEAN)  # /v1/embeddings: one vector per input
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(index["<unk>"])
    w.add_bos_token_id(index["<s>"])
    w.add_eos_token_id(eos)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.add_chat_template(CHATML)
    for name, dims, dtype, _ in plan:  # the infos first, the data one tensor at a time after
        w.add_tensor_info(name, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, dims, dtype, make in plan:
        data = make()
        assert data.shape == dims and data.dtype == dtype
        w.write_tensor_data(data)
    w.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write a llama GGUF that answers ANSWER (tiny by default).")
    p.add_argument("out")
    for field in fields(Shape):
        if field.type == "bool":
            p.add_argument(f"--{field.name}", action="store_true", help="matrices in f16")
        else:
            p.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=field.default)
    opts = vars(p.parse_args(argv))
    out = opts.pop("out")
    write(out, shape=Shape(**opts))
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
