"""CLIP token counts for captions (the SD text encoder sees 75 tokens plus BOS/EOS per chunk).

A transformers ``CLIPTokenizer`` is built once from open_clip's bundled BPE merges, deriving vocab.json and
merges.txt exactly as CLIP's SimpleTokenizer does, and cached under ``~/.cache/curate/clip_tokenizer``.
Falls back to open_clip's own tokenizer. Both give the real CLIP token ids.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path

MAX_TOKENS = 75  # 77 minus BOS and EOS
_N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def cache_dir() -> Path:
    return Path(os.environ.get("CURATE_CACHE", os.path.expanduser("~/.cache/curate"))) / "clip_tokenizer"


def write_tokenizer_files(bpe_gz: str | os.PathLike, out: Path) -> Path:
    """vocab.json + merges.txt from CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (same ids as SimpleTokenizer)."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "vocab.json.tmp"
    tmp.write_text(json.dumps({v: i for i, v in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    # transformers' CLIPTokenizer skips the first line (a version header), like SimpleTokenizer does.
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tmp.replace(out / "vocab.json")
    return out


def _fast_counter(d: Path) -> Callable[[str], int] | None:
    """The saved tokenizer.json through the Rust ``tokenizers`` package: no transformers import."""
    if not (d / "tokenizer.json").exists():
        return None
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    except Exception:
        return None
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def _transformers_counter(d: Path) -> Callable[[str], int] | None:
    """Build a transformers CLIPTokenizer from open_clip's BPE once; save tokenizer.json for the fast path."""
    try:
        from open_clip.tokenizer import default_bpe
        from transformers import CLIPTokenizer

        if not (d / "vocab.json").exists():
            write_tokenizer_files(default_bpe(), d)
        tok = CLIPTokenizer.from_pretrained(str(d), model_max_length=77)
        try:
            tok.save_pretrained(str(d))
        except OSError:
            pass
    except Exception:
        return None
    return lambda text: len(tok(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])


def _open_clip_counter() -> Callable[[str], int] | None:
    try:
        from open_clip.tokenizer import SimpleTokenizer

        st = SimpleTokenizer()
    except Exception:
        return None
    return lambda text: len(st.encode(text))


@functools.lru_cache(maxsize=1)
def token_counter() -> Callable[[str], int] | None:
    """A function text -> number of CLIP tokens (without BOS/EOS), or None if no tokenizer is available."""
    d = cache_dir()
    return _fast_counter(d) or _transformers_counter(d) or _open_clip_counter()


def count_tokens(texts: list[str]) -> list[int | None]:
    fn = token_counter()
    return [fn(t) if fn else None for t in texts]
