"""Helpers for tests: tiny Hugging Face transformers models built from configs (never downloaded),
saved with ``save_pretrained`` as a base directory, and seeded low-rank experts as real safetensors.

Builders return the base directory; ``low_rank_experts`` writes experts = base + seeded low-rank
updates of every 2-D weight; ``load_and_run`` loads a directory with ``from_pretrained`` exactly as
an inference server would and checks the outputs are finite. Other test modules may append their
own builders here (one function per architecture, keyword-only options).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergewatch.checkpoint.writer import write_safetensors_file
from tests.helpers import load_all

#: ``save_pretrained(max_shard_size=...)`` for a sharded base: small enough that a tiny model
#: spreads over several shards.
SHARD_SIZE = "20KB"


def _save(model, tmp: Path, name: str, *, dtype: torch.dtype, shards: bool) -> Path:
    """Seed-initialised ``model`` cast to ``dtype`` and saved as ``tmp/name`` (a base directory)."""
    out = Path(tmp) / name
    model = model.to(dtype)
    model.save_pretrained(out, max_shard_size=SHARD_SIZE if shards else "10GB")
    return out


def tiny_qwen3(tmp: Path, *, tied: bool = False, dtype: torch.dtype = torch.float32, shards: bool = False, seed: int = 0) -> Path:
    """A 2-layer Qwen3 (GQA: 4 query heads, 2 key/value heads) saved under ``tmp``."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    return _save(AutoModelForCausalLM.from_config(cfg), tmp, f"qwen3-{'tied' if tied else 'untied'}", dtype=dtype, shards=shards)


def tiny_llama(tmp: Path, *, tied: bool = False, dtype: torch.dtype = torch.float32, shards: bool = False, seed: int = 0) -> Path:
    """A 2-layer Llama (GQA) saved under ``tmp``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    return _save(AutoModelForCausalLM.from_config(cfg), tmp, f"llama-{'tied' if tied else 'untied'}", dtype=dtype, shards=shards)


def tiny_gpt2(tmp: Path, *, tied: bool = True, dtype: torch.dtype = torch.float32, shards: bool = False, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (Conv1D weights stored in × out) saved under ``tmp``; GPT-2 ties by default."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=tied,
    )
    return _save(AutoModelForCausalLM.from_config(cfg), tmp, f"gpt2-{'tied' if tied else 'untied'}", dtype=dtype, shards=shards)


def tiny_bert(tmp: Path, *, dtype: torch.dtype = torch.float32, shards: bool = False, seed: int = 0) -> Path:
    """A 2-layer BERT encoder (``AutoModel``) saved under ``tmp``."""
    from transformers import AutoModel, BertConfig

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )
    return _save(AutoModel.from_config(cfg), tmp, "bert", dtype=dtype, shards=shards)


def low_rank_experts(
    base: Path, out: Path, n: int, *, seed: int = 1, rank: int = 2, scale: float = 0.02, extra: dict | None = None
) -> list[Path]:
    """``n`` experts ``out/expert-<i>.safetensors`` = base + a seeded rank-``rank`` update of every
    2-D tensor (scaled to ``scale`` × the tensor's RMS), in the base's dtype. ``extra`` adds
    tensors to every expert (e.g. a tied ``lm_head.weight`` the base does not store)."""
    theta0 = load_all(base)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        expert = {}
        for k, v in theta0.items():
            if v.ndim == 2 and v.is_floating_point():
                a = torch.randn(v.shape[0], rank, generator=g)
                b = torch.randn(rank, v.shape[1], generator=g)
                d = a @ b
                d = d * (scale * v.float().pow(2).mean().sqrt().clamp_min(1e-3) / d.pow(2).mean().sqrt())
                expert[k] = (v.float() + d).to(v.dtype)
            else:
                expert[k] = v.clone()
        if extra:
            expert.update({k: (t(expert) if callable(t) else t) for k, t in extra.items()})
        p = out / f"expert-{i + 1}.safetensors"
        write_safetensors_file(p, expert)
        paths.append(p)
    return paths


def load_and_run(path: Path, *, causal: bool = True):
    """``from_pretrained(path)`` as a server would (Auto class from config.json alone) and one forward
    pass on a fixed batch; asserts finite outputs and returns the model."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(path)
    model.eval()
    ids = torch.arange(12).reshape(2, 6) % 90 + 3
    with torch.no_grad():
        out = model(input_ids=ids)
    y = out.logits if causal else out.last_hidden_state
    assert torch.isfinite(y.float()).all(), f"{path}: non-finite outputs"
    return model


def _tiny_causal_lm(tmp: Path, name: str, cfg, *, dtype: torch.dtype, shards: bool, seed: int) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return _save(AutoModelForCausalLM.from_config(cfg), tmp, name, dtype=dtype, shards=shards)


def tiny_phi3(tmp: Path, *, dtype: torch.dtype = torch.float32, shards: bool = False, seed: int = 0) -> Path:
    """A 2-layer Phi-3 (fused ``qkv_proj`` of q 32, k 16, v 16 rows: 4 query heads, 2 key/value
    heads of 8; fused ``gate_up_proj``) saved under ``tmp``."""
    from transformers import Phi3Config

    cfg = Phi3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return _tiny_causal_lm(tmp, "phi3", cfg, dtype=dtype, shards=shards, seed=seed)


def tiny_gpt_neox(tmp: Path, *, dtype: torch.dtype = torch.float32, shards: bool = False, seed: int = 0) -> Path:
    """A 2-layer GPT-NeoX (``query_key_value`` interleaving q, k, v per head: 4 heads of 8)."""
    from transformers import GPTNeoXConfig

    cfg = GPTNeoXConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
    )
    return _tiny_causal_lm(tmp, "gpt_neox", cfg, dtype=dtype, shards=shards, seed=seed)


def tiny_qwen2(tmp: Path, *, dtype: torch.dtype = torch.float32, shards: bool = False, seed: int = 0) -> Path:
    """A 2-layer Qwen2 (GQA, q/k/v biases) saved under ``tmp``."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
    )
    return _tiny_causal_lm(tmp, "qwen2", cfg, dtype=dtype, shards=shards, seed=seed)


def tiny_mistral(tmp: Path, *, dtype: torch.dtype = torch.float32, shards: bool = False, seed: int = 0) -> Path:
    """A 2-layer Mistral (GQA) saved under ``tmp``."""
    from transformers import MistralConfig

    cfg = MistralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
    )
    return _tiny_causal_lm(tmp, "mistral", cfg, dtype=dtype, shards=shards, seed=seed)
