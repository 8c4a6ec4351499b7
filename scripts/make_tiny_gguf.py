#!/usr/bin/env python3
"""Write a tiny but valid llama-architecture GGUF model, for the real-engine test tier.

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

    python scripts/make_tiny_gguf.py OUT.gguf       # needs numpy and gguf (pip install -e '.[real]')
"""

from __future__ import annotations

import sys

import numpy as np
from gguf import GGUFWriter, PoolingType, TokenType

ANSWER = "Hello! This is a tiny test model speaking."
# The answer as SentencePiece pieces ("\u2581" marks the start of a word), in order.
ANSWER_PIECES = ["Hello", "!", "\u2581This", "\u2581is", "\u2581a", "\u2581tiny", "\u2581test", "\u2581model",
                 "\u2581speaking", "."]
WORDS = ["\u2581the", "\u2581hello", "\u2581Hello", "\u2581you", "\u2581say", "\u2581world", "he", "ll", "llo",
         "ello", "Th", "This", "is", "in", "te", "od", "el", "ea", "ing"]

DIM, HEADS, FF, BLOCKS, CTX = 64, 4, 128, 2, 32768  # RoPE: a long context costs only KV memory when used
CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style: control tokens, the 256 byte-fallback tokens, single characters,
    then whole pieces (a higher score merges first)."""
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
    names = list(pieces)
    return names, [pieces[n][0] for n in names], [int(pieces[n][1]) for n in names]


def write(path: str, seed: int = 7) -> None:
    rng = np.random.default_rng(seed)
    tokens, scores, types = vocabulary()
    index = {t: i for i, t in enumerate(tokens)}
    chain = [index[p] for p in ANSWER_PIECES]
    eos = index["</s>"]
    assert len(chain) < DIM

    dim_of = {token: k + 1 for k, token in enumerate(chain)}  # dimension 0: every other token
    embeddings = np.zeros((len(tokens), DIM), dtype=np.float32)
    for token in range(len(tokens)):
        embeddings[token, dim_of.get(token, 0)] = 1.0
    free = len(chain) + 1
    embeddings[:, free:] = rng.normal(0.0, 0.1, (len(tokens), DIM - free))

    # After RMS norm the one-hot dimension is about 6.5: a weight of 5 gives the next token of
    # the answer a logit near 32, every other token about 0.
    output = np.zeros((len(tokens), DIM), dtype=np.float32)
    output[chain[0], 0] = 5.0
    for token, successor in zip(chain, [*chain[1:], eos]):
        output[successor, dim_of[token]] = 5.0

    def noise(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 1e-3, shape).astype(np.float32)

    w = GGUFWriter(path, "llama")
    w.add_name("llm-router tiny test model")
    w.add_context_length(CTX)
    w.add_embedding_length(DIM)
    w.add_block_count(BLOCKS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(DIM // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_file_type(0)  # all tensors f32
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

    # numpy shapes are (rows, columns): the reverse of ggml's ne.
    w.add_tensor("token_embd.weight", embeddings)
    for block in range(BLOCKS):
        name = f"blk.{block}."
        w.add_tensor(name + "attn_norm.weight", np.ones(DIM, dtype=np.float32))
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"{name}{part}.weight", noise(DIM, DIM))
        w.add_tensor(name + "ffn_norm.weight", np.ones(DIM, dtype=np.float32))
        w.add_tensor(name + "ffn_gate.weight", noise(FF, DIM))
        w.add_tensor(name + "ffn_up.weight", noise(FF, DIM))
        w.add_tensor(name + "ffn_down.weight", noise(DIM, FF))
    w.add_tensor("output_norm.weight", np.ones(DIM, dtype=np.float32))
    w.add_tensor("output.weight", output)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_tiny_gguf.py OUT.gguf")
    write(sys.argv[1])
    print(f"wrote {sys.argv[1]}")
