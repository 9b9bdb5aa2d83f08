"""A tiny random BLIP captioner saved like a hub download (safetensors + processor files), built offline."""

from __future__ import annotations

from pathlib import Path

WORDS = [
    "a",
    "photo",
    "of",
    "cat",
    "dog",
    "on",
    "the",
    "grass",
    "red",
    "blue",
    "car",
    "sitting",
    "with",
    "house",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def build(folder: Path, seed: int = 0, image_size: int = 32) -> Path:
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIALS + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]", model_max_length=64)
    ids = {t: i for i, t in enumerate(vocab)}
    text = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=32,
        initializer_range=0.5, bos_token_id=ids["[DEC]"], sep_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"], eos_token_id=ids["[SEP]"],
    )  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8, initializer_range=0.5)  # fmt: skip
    cfg = BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    proc = BlipProcessor(BlipImageProcessor(size={"height": image_size, "width": image_size}), tok)
    proc.save_pretrained(folder)
    return folder
