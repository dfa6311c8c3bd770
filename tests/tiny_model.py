#!/usr/bin/env python3
"""Write a tiny random-weight Llama as GGUF, with a real tokenizer, for the real-engine tests.

    python tiny_model.py --out tiny-chatml.gguf     # in the engine's venv (realengine.py)

The tokenizer is a SentencePiece BPE of 2,048 pieces trained here on this repository's own
README and sources, so nothing is downloaded and the text is there wherever the checkout is.
The model is 2 layers of width 64 with seeded random weights and a ChatML chat template; it
writes word pieces, never stops on its own, and answers in milliseconds on one core.
Needs gguf, sentencepiece and numpy.
"""

from __future__ import annotations

import argparse
import io
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import sentencepiece

ROOT = Path(__file__).resolve().parent.parent
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{{ message['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB, LAYERS, WIDTH, HEADS, FFN, CONTEXT = 2048, 2, 64, 4, 128, 512
SEED = 20261102
# Hidden dimension 0 is a constant channel: every embedding holds BIAS_LEVEL there and the
# small random blocks barely move it, so the output head can give any token a fixed bias
# through its column 0. That is how tokens are kept out of the replies (see head()).
BIAS_LEVEL = 4.0
SUPPRESS = -16.0


def corpus_lines() -> Iterator[str]:
    """The training text: the README and the Python sources, without control characters."""
    paths = [ROOT / "README.md", *sorted((ROOT / "koubou_spool").rglob("*.py"))]
    for path in paths:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = "".join(" " if unicodedata.category(c) == "Cc" else c for c in line).strip()
            if line:
                yield line


def train_tokenizer(workdir: Path) -> sentencepiece.SentencePieceProcessor:
    """A BPE tokenizer with byte fallback and the two ChatML markers as pieces of their own."""
    corpus = workdir / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines()) + "\n", encoding="utf-8")
    model = io.BytesIO()
    # byte_fallback: llama.cpp's SentencePiece tokenizer needs <0x00>..<0xFF> to encode a
    # character the pieces lack; without them it throws. identity: llama.cpp does not normalise.
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_writer=model, model_type="bpe", vocab_size=VOCAB,
        character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=[IM_START, IM_END],
        num_threads=1, minloglevel=2)
    corpus.unlink()
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def token_type(sp: sentencepiece.SentencePieceProcessor, i: int) -> gguf.TokenType:
    """The GGUF type of piece i; the ChatML markers are CONTROL, parsed whole, never printed."""
    if sp.is_unknown(i):
        return gguf.TokenType.UNKNOWN
    if sp.is_control(i) or sp.id_to_piece(i) in (IM_START, IM_END):
        return gguf.TokenType.CONTROL
    if sp.is_byte(i):
        return gguf.TokenType.BYTE
    if sp.is_unused(i):
        return gguf.TokenType.UNUSED
    return gguf.TokenType.NORMAL


def add_metadata(writer: gguf.GGUFWriter) -> None:
    writer.add_name("tiny-random-llama-chatml")
    writer.add_description("random weights and a locally trained tokenizer, for API tests only")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(WIDTH)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(WIDTH // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)


def add_tokenizer(writer: gguf.GGUFWriter, sp: sentencepiece.SentencePieceProcessor) -> None:
    ids = range(sp.get_piece_size())
    writer.add_vocab_size(len(ids))
    writer.add_tokenizer_model("llama")  # SentencePiece
    writer.add_tokenizer_pre("default")
    writer.add_token_list([sp.id_to_piece(i) for i in ids])
    writer.add_token_scores([sp.get_score(i) for i in ids])
    writer.add_token_types([token_type(sp, i) for i in ids])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.piece_to_id(IM_END))  # a ChatML turn ends with <|im_end|>
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML)


def head(sp: sentencepiece.SentencePieceProcessor, rng: np.random.Generator) -> np.ndarray:
    """The output head, with the tokens a reply must not contain pushed to about -60 logits.

    Lone bytes would come out as broken UTF-8 (and make llama-cpp-python's streaming re-decode
    the whole reply at every token); <unk>, <s> and <|im_start|> do not belong in a reply; the
    two end tokens are suppressed so that every reply runs to max_tokens, which tests rely on.
    """
    weights = (rng.standard_normal((sp.get_piece_size(), WIDTH)) * 0.5).astype(np.float32)
    weights[:, 0] = 0.0
    for i in range(sp.get_piece_size()):
        if token_type(sp, i) != gguf.TokenType.NORMAL:
            weights[i, 0] = SUPPRESS
    return weights


def tensor(kind: gguf.MODEL_TENSOR, block: int | None = None) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=block) + ".weight"


def add_weights(writer: gguf.GGUFWriter, sp: sentencepiece.SentencePieceProcessor) -> None:
    """Seeded random weights; numpy shapes are (out, in), gguf stores them reversed."""
    rng = np.random.default_rng(SEED)
    T = gguf.MODEL_TENSOR

    def random(rows: int, cols: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    ones = np.ones(WIDTH, dtype=np.float32)
    embedding = random(sp.get_piece_size(), WIDTH, scale=1.0)
    embedding[:, 0] = BIAS_LEVEL
    writer.add_tensor(tensor(T.TOKEN_EMBD), embedding)
    for b in range(LAYERS):
        writer.add_tensor(tensor(T.ATTN_NORM, b), ones)
        for kind in (T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT):
            writer.add_tensor(tensor(kind, b), random(WIDTH, WIDTH))
        writer.add_tensor(tensor(T.FFN_NORM, b), ones)
        writer.add_tensor(tensor(T.FFN_GATE, b), random(FFN, WIDTH))
        writer.add_tensor(tensor(T.FFN_UP, b), random(FFN, WIDTH))
        writer.add_tensor(tensor(T.FFN_DOWN, b), random(WIDTH, FFN))
    writer.add_tensor(tensor(T.OUTPUT_NORM), ones)
    writer.add_tensor(tensor(T.OUTPUT), head(sp, rng))


def write(out: Path) -> None:
    """The whole model file at out."""
    out.parent.mkdir(parents=True, exist_ok=True)
    sp = train_tokenizer(out.parent)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    add_metadata(writer)
    add_tokenizer(writer, sp)
    add_weights(writer, sp)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    write(parser.parse_args().out)


if __name__ == "__main__":
    main()
