"""A BERT sentence encoder in plain PyTorch: mean-pooled, normalized embeddings of a sentence-transformers folder.

It computes what sentence-transformers computes for the common Transformer -> mean Pooling -> Normalize stack
over a BERT model (all-MiniLM-L6-v2, the default embedder), without importing sentence-transformers and
transformers: that import cost 5-14 s in every `dsarag ingest` / `ask` process, more than embedding a small
folder. Other folders fall back to sentence-transformers (rag/embed.py decides).
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import Tensor, nn


def is_plain_bert_mean_pooling(folder: Path) -> bool:
    """Whether `folder` is a sentence-transformers BERT with mean pooling and normalization, nothing else."""
    try:
        modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((folder / "modules.json").read_text())]
        pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return False
    pooling_modes = {key for key, value in pooling.items() if key.startswith("pooling_mode") and value}
    return (
        modules == ["Transformer", "Pooling", "Normalize"]
        and pooling_modes == {"pooling_mode_mean_tokens"}
        and config.get("model_type") == "bert"
        and config.get("position_embedding_type", "absolute") == "absolute"
        and config.get("hidden_act") == "gelu"
        and (folder / "model.safetensors").is_file()
        and (folder / "tokenizer.json").is_file()
        and (folder / "sentence_bert_config.json").is_file()  # its max_seq_length sets the truncation
    )


class BertLayer(nn.Module):
    """Post-LayerNorm transformer block: x = LN(x + attention(x)); x = LN(x + FFN(x))."""

    def __init__(self, dim: int, n_heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attention_out, self.attention_norm = nn.Linear(dim, dim), nn.LayerNorm(dim, eps=eps)
        self.up, self.down, self.ffn_norm = (
            nn.Linear(dim, hidden),
            nn.Linear(hidden, dim),
            nn.LayerNorm(dim, eps=eps),
        )

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        batch, seq_len, dim = x.shape
        heads = [
            proj(x).view(batch, seq_len, self.n_heads, -1).transpose(1, 2)
            for proj in (self.query, self.key, self.value)
        ]
        attended = F.scaled_dot_product_attention(*heads, attn_mask=key_mask)  # padded keys masked out
        x = self.attention_norm(x + self.attention_out(attended.transpose(1, 2).reshape(batch, seq_len, dim)))
        return self.ffn_norm(x + self.down(F.gelu(self.up(x))))


class BertEncoder(nn.Module):
    """BertModel's embeddings and encoder (no pooler), then masked mean pooling and L2 normalization."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        dim, eps = config["hidden_size"], config["layer_norm_eps"]
        self.word = nn.Embedding(config["vocab_size"], dim)
        self.position = nn.Embedding(config["max_position_embeddings"], dim)
        self.token_type = nn.Embedding(config["type_vocab_size"], dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.layers = nn.ModuleList(
            BertLayer(dim, config["num_attention_heads"], config["intermediate_size"], eps)
            for _ in range(config["num_hidden_layers"])
        )

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask (B, T) -> unit vectors (B, dim)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.norm(self.word(ids) + self.position(positions) + self.token_type(torch.zeros_like(ids)))
        key_mask = mask[:, None, None, :].bool()
        for layer in self.layers:
            x = layer(x, key_mask)
        weights = mask[..., None].to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


def our_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF BertModel parameter names -> BertEncoder's (the pooler and position_ids buffer are unused)."""
    renames = {
        "embeddings.word_embeddings.": "word.",
        "embeddings.position_embeddings.": "position.",
        "embeddings.token_type_embeddings.": "token_type.",
        "embeddings.LayerNorm.": "norm.",
        "attention.self.query.": "query.",
        "attention.self.key.": "key.",
        "attention.self.value.": "value.",
        "attention.output.dense.": "attention_out.",
        "attention.output.LayerNorm.": "attention_norm.",
        "intermediate.dense.": "up.",
        "output.dense.": "down.",
        "output.LayerNorm.": "ffn_norm.",
    }
    out = {}
    for name, tensor in state.items():
        name = name.removeprefix("bert.")
        if name.startswith("pooler.") or name.endswith("position_ids"):
            continue
        name = name.replace("encoder.layer.", "layers.")
        for old, new in renames.items():
            name = name.replace(old, new)
        out[name] = tensor
    return out


class SentenceEncoder:
    """Tokenizer + BertEncoder of a folder; `encode` batches texts by length like sentence-transformers."""

    def __init__(self, folder: Path, device: str) -> None:
        config = json.loads((folder / "config.json").read_text())
        bert_config = json.loads((folder / "sentence_bert_config.json").read_text())
        self.device = torch.device(device)
        self.model = BertEncoder(config)
        self.model.load_state_dict(our_names(load_file(folder / "model.safetensors")))
        self.model.to(self.device).eval()
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=int(bert_config.get("max_seq_length", 256)))
        self.tokenizer.enable_padding(pad_id=config.get("pad_token_id", 0))

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        order = np.argsort([-len(text) for text in texts], kind="stable")  # similar lengths pad little
        out = np.empty((len(texts), self.model.norm.normalized_shape[0]), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            batch = self.tokenizer.encode_batch([texts[i] for i in rows])
            ids = torch.tensor([b.ids for b in batch], device=self.device)
            mask = torch.tensor([b.attention_mask for b in batch], device=self.device)
            out[rows] = self.model(ids, mask).float().cpu().numpy()
        return out
