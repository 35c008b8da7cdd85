"""Tiny models and data, built offline in seconds: for the demo, the tests and the benchmark.

``make_corpus`` writes syllogism-like sentences (small vocabulary, real structure, so the loss
visibly falls); ``make_tiny_model`` trains a byte-level BPE tokenizer on them and builds a
randomly initialised Llama from a :class:`transformers.LlamaConfig`, saved like any Hugging
Face model folder (config.json, model.safetensors, tokenizer.json).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from . import env

_NOUNS = (
    "cats dogs birds fish whales bats frogs snakes mammals animals reptiles pets hunters swimmers flyers "
    "runners predators insects bees ants spiders wolves foxes owls hawks sharks crabs horses cows sheep goats "
    "lions tigers bears rabbits mice rats squirrels deer moose otters seals penguins eagles parrots crows doves "
    "turtles lizards toads salmon trout eels squids octopi snails worms beetles moths butterflies wasps hornets "
    "herbivores carnivores omnivores climbers diggers grazers scavengers migrants sleepers singers"
).split()
_ADJECTIVES = (
    "small large wild tame young old quick slow brave shy loud quiet spotted striped northern southern "
    "hungry sleepy clever curious gentle fierce"
).split()
_FORMS = (
    ("All {a} are {b}. All {b} are {c}. Therefore all {a} are {c}.", "valid"),
    ("No {a} are {b}. All {c} are {a}. Therefore no {c} are {b}.", "valid"),
    ("All {a} are {b}. Some {c} are {a}. Therefore some {c} are {b}.", "valid"),
    ("Some {a} are {b}. Some {b} are {c}. Therefore some {a} are {c}.", "invalid"),
    ("All {a} are {b}. All {c} are {b}. Therefore all {a} are {c}.", "invalid"),
)


def make_corpus(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` records ``{"text": ..., "label": ...}``, deterministic in ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        form, label = rng.choice(_FORMS)
        a, b, c = (f"{rng.choice(_ADJECTIVES)} {n}" if rng.random() < 0.3 else n for n in rng.sample(_NOUNS, 3))
        out.append({"text": f"{form.format(a=a, b=b, c=c)} This argument is {label}.", "label": label})
    return out


def write_jsonl(path: Path, records: list[dict[str, Any]], files: int = 1) -> list[Path]:
    """Write records as JSONL: one file at ``path``, or ``files`` shards inside directory ``path``."""
    if files <= 1 and path.suffix == ".jsonl":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")
        return [path]
    path.mkdir(parents=True, exist_ok=True)
    per = -(-len(records) // files)
    out = []
    for i in range(files):
        p = path / f"shard-{i:05d}.jsonl"
        p.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records[i * per : (i + 1) * per]),
                     encoding="utf-8")
        out.append(p)
    return out


def make_tiny_model(
    path: Path,
    texts: list[str],
    *,
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 256,
    seed: int = 0,
) -> Path:
    """A random Llama and a BPE tokenizer trained on ``texts``, saved as a Hugging Face folder."""
    env.go_offline()
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    env.quiet_transformers()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    cfg = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=hf_tok.pad_token_id,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    hf_tok.save_pretrained(str(path))
    return path


# The demo model (README demo, benchmark): ~0.5 M parameters, ~40 steps/s on one CPU thread.
DEMO_MODEL = {"vocab_size": 1024, "hidden": 128, "layers": 2, "heads": 4}
DEMO_RECORDS = 4000
DEMO_SHARDS = 4


def build_demo(root: Path, records: int = DEMO_RECORDS, shards: int = DEMO_SHARDS) -> tuple[Path, Path]:
    """Write the demo dataset (``root/data``, JSONL shards) and model folder (``root/model``)."""
    corpus = make_corpus(records, seed=0)
    data = root / "data"
    write_jsonl(data, corpus, files=shards)
    model = make_tiny_model(root / "model", [r["text"] for r in corpus], **DEMO_MODEL)
    return model, data
