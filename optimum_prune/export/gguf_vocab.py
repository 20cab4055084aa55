"""The tokenizer part of a GGUF file, from the checkpoint's `tokenizer.json`: token list and types, merges, special
token ids and the pre-tokenizer name llama.cpp selects its splitting regex by.

Byte-level BPE (GPT-2 style: GPT-2, Llama 3, Qwen2 and the shared tiny models) is written as llama.cpp's `gpt2`
tokenizer model; SentencePiece-style BPE with byte fallback (Llama 2, Mistral) as `llama`, through the `gguf`
package's `LlamaHfVocab`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import PruneInputError


logger = logging.getLogger(__name__)

# llama.cpp's pre-tokenizer names for the splitting regexes of the tokenizers it knows (llama-vocab.cpp).
_PRE_TOKENIZER_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",  # noqa: E501
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def add_tokenizer(writer, model_dir: Path, vocab_size: int) -> None:
    """Writes the checkpoint's tokenizer, padded to the embedding's `vocab_size` rows with unused tokens."""
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise PruneInputError(f"{model_dir} has no tokenizer.json; GGUF export writes the tokenizer from it.")
    tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE":
        raise PruneInputError(f"GGUF export writes BPE tokenizers; {tokenizer_file} holds a {model.get('type')} one.")
    if model.get("byte_fallback"):
        _add_sentencepiece_bpe(writer, model_dir, vocab_size)
    else:
        _add_byte_level_bpe(writer, model_dir, tokenizer, vocab_size)


def token_texts(model_dir: Path) -> set[str]:
    """The texts of every token in the checkpoint's tokenizer.json (vocabulary and added tokens)."""
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tokenizer.get("model", {}).get("vocab") or {}
    texts = set(vocab) if isinstance(vocab, dict) else {entry[0] for entry in vocab}  # BPE: dict; Unigram: pairs
    return texts | {added["content"] for added in tokenizer.get("added_tokens", [])}


def byte_level_tokens(tokenizer: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token texts and llama.cpp token types, index = token id: vocabulary NORMAL, special added tokens CONTROL, other
    added tokens USER_DEFINED, and UNUSED `[PAD<id>]` placeholders up to the embedding's row count."""
    import gguf

    by_id = {int(token_id): (text, gguf.TokenType.NORMAL) for text, token_id in tokenizer["model"]["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        token_type = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], token_type)
    if by_id and max(by_id) >= vocab_size:
        raise PruneInputError(
            f"The tokenizer has token id {max(by_id)} but the model has only {vocab_size} embedding rows."
        )
    texts, types = [], []
    for token_id in range(vocab_size):
        text, token_type = by_id.get(token_id, (f"[PAD{token_id}]", gguf.TokenType.UNUSED))
        texts.append(text)
        types.append(int(token_type))
    return texts, types


def pre_tokenizer_name(tokenizer: dict) -> str:
    """llama.cpp's name for the tokenizer's splitting regex: `gpt-2` for a plain ByteLevel pre-tokenizer, known regexes
    by their llama.cpp name, else `default` (with a warning: llama.cpp may then split text differently)."""
    pre = tokenizer.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    for step in pre.get("pretokenizers", []):
        regex = (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split" else None
        if regex in _PRE_TOKENIZER_REGEXES:
            return _PRE_TOKENIZER_REGEXES[regex]
    logger.warning(
        "Unknown pre-tokenizer; written as llama.cpp's `default`, whose text splitting may differ "
        "(token ids given to llama.cpp are unaffected)."
    )
    return "default"


def _add_byte_level_bpe(writer, model_dir: Path, tokenizer: dict, vocab_size: int) -> None:
    import gguf

    texts, types = byte_level_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(texts)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    # Transformers' byte-level BPE adds no BOS unless its post-processor says so (which SpecialVocab reads);
    # llama.cpp's default for `gpt2` tokenizers would add one.
    special.add_special_token.setdefault("bos", False)
    special.add_to_gguf(writer, quiet=True)


def _add_sentencepiece_bpe(writer, model_dir: Path, vocab_size: int) -> None:
    import gguf

    vocab = gguf.LlamaHfVocab(model_dir)
    texts, scores, types = [], [], []
    for text, score, token_type in vocab.all_tokens():
        texts.append(text)
        scores.append(score)
        types.append(int(token_type))
    if len(texts) > vocab_size:
        raise PruneInputError(f"The tokenizer has {len(texts)} tokens but the model has only {vocab_size} rows.")
    for token_id in range(len(texts), vocab_size):
        texts.append(f"[PAD{token_id}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(texts)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
