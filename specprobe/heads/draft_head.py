"""A trained draft head over the target's hidden states: EAGLE-3 style, with ConFu's contemplate tokens.

EAGLE (Li et al. 2024, arXiv 2401.15077; EAGLE-2 arXiv 2406.16858; EAGLE-3 arXiv 2503.01840)
drafts with ONE decoder layer that reads the target's own features instead of re-reading text:

    row p:  x_p = in_proj([norm(fuse(low_p, mid_p, high_p)), norm(embed(token_{p+1}))])
            o_p = layer(x_p | rows <= p)              # attention over the head's own KV cache
            logits = target_lm_head(norm(o_p))         # predicts token_{p+2}

low / mid / high are the target's hidden states after three of its layers (EAGLE-3's fusion).
Deeper drafts feed the head its own output as the feature: (o_p, drafted token) -> the next one.
Training unrolls those steps ("training-time test"), so the head learns from its own features.

ConFu (arXiv 2603.08899) adds `k` contemplate tokens: soft inputs the verification forward places
after a candidate node, which no real token attends to (auxiliary rows, tree.py), so the target's
output is unchanged. Their input embedding is dynamic:

    c_j = prompt_j + sum_e gate_e(h) * up_e(down_e(h))     # j = 1..k; a mixture of low-rank experts

where h is the target's top feature of the last token whose features are known. The target's
features at contemplate row j (its own view of the token j + 1 ahead) become a "plan" added to the
head's output at draft depth j (depth > k uses row k). `plan` starts at zero, so an untrained ConFu
head is exactly its EAGLE head.

The head is small (one layer; the LM head and token embeddings are the target's, frozen) and saves
as one directory: config.json + head.pt.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidOptionError
from ..store import atomic_write


@dataclass
class HeadConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    feature_layers: tuple[int, int, int]  # indices into the target's hidden_states tuple (0 = embeddings)
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    contemplate: int = 0  # k contemplate tokens; 0 = a plain EAGLE head
    experts: int = 4
    expert_rank: int = 32
    draft_vocab: int = 0  # size of the head's own vocabulary (EAGLE-3's reduced draft vocabulary); 0 = the target's
    target: str = ""  # the target model it was trained on (a name, for error messages)
    extra: dict = field(default_factory=dict)  # training facts (data size, time), informative only

    @classmethod
    def for_target(cls, target, contemplate: int = 0, name: str = "") -> "HeadConfig":
        """A head shaped like `target` (a TorchBackend)."""
        cfg = target.config
        n_layers = cfg.num_hidden_layers
        heads = cfg.num_attention_heads
        return cls(
            hidden_size=cfg.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            intermediate_size=cfg.intermediate_size,
            vocab_size=target.vocab_size,
            feature_layers=(min(2, n_layers), n_layers // 2, max(n_layers - 2, 1)),
            rms_eps=float(getattr(cfg, "rms_norm_eps", 1e-5)),
            contemplate=contemplate,
            target=name,
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (rotate-half form). x [heads, n, d], positions [n]."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)  # [d/2]
    angles = positions.float()[:, None] * inv[None]  # [n, d/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # [n, d]
    half = d // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class DraftHead(nn.Module):
    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = c = config
        h, hd = c.hidden_size, c.head_dim
        self.fuse = nn.Linear(3 * h, h, bias=False)
        self.norm_feature = RMSNorm(h, c.rms_eps)
        self.norm_token = RMSNorm(h, c.rms_eps)
        self.in_proj = nn.Linear(2 * h, h, bias=False)
        self.norm_attn = RMSNorm(h, c.rms_eps)
        self.q_proj = nn.Linear(h, c.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(h, c.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(h, c.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(c.num_heads * hd, h, bias=False)
        self.norm_mlp = RMSNorm(h, c.rms_eps)
        self.gate_proj = nn.Linear(h, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, h, bias=False)
        self.norm_out = RMSNorm(h, c.rms_eps)
        # the target token ids the head can draft (EAGLE-3: the most frequent ones; the target's LM
        # head restricted to them costs a fraction of the full one, in training and in drafting)
        self.register_buffer("vocab_ids", torch.arange(c.draft_vocab or c.vocab_size))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        if c.contemplate:
            k, e, r = c.contemplate, c.experts, c.expert_rank
            self.contemplate_prompts = nn.Parameter(torch.zeros(k, h))  # set from the vocabulary mean by `init_from_target`
            self.expert_gate = nn.Linear(h, e)
            self.expert_down = nn.Parameter(torch.randn(e, h, r) * (1.0 / math.sqrt(h)))
            self.expert_up = nn.Parameter(torch.zeros(e, r, k * h))  # zero: the prompts alone at first
            self.plan = nn.Linear(3 * h, h, bias=False)
            nn.init.zeros_(self.plan.weight)  # zero: an untrained ConFu head is its EAGLE head

    # -- set-up ------------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_target(self, target) -> None:
        """Start the layer from the target's last decoder layer where the shapes agree (faster
        training than random weights), the output norm from the target's final norm, and the
        contemplate prompts from the mean input embedding of the vocabulary (ESP's best mask)."""
        decoder = target.model.get_decoder()
        layer = decoder.layers[-1]
        pairs = {
            "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
            "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
            "down_proj": "mlp.down_proj",
        }
        source = dict(layer.named_parameters())
        for mine, theirs in pairs.items():
            w = source.get(theirs + ".weight")
            if w is not None and w.shape == getattr(self, mine).weight.shape:
                getattr(self, mine).weight.copy_(w.float())
        norm = getattr(decoder, "norm", None)
        if norm is not None and getattr(norm, "weight", None) is not None and norm.weight.shape == self.norm_out.weight.shape:
            w = norm.weight.float()
            # Gemma's RMSNorm scales by (1 + weight); ours by weight
            self.norm_out.weight.copy_(w + 1 if "Gemma" in type(norm).__name__ else w)
        if self.config.contemplate:  # the vocabulary's mean embedding: the vector ESP's vocab-mean masks use
            mean = target.embedding_stats()[0]
            self.contemplate_prompts.copy_(mean.to(self.contemplate_prompts)[None].expand_as(self.contemplate_prompts))

    def set_vocabulary(self, ids: list[int]) -> None:
        """Draft only these target token ids (sorted); the config records their number."""
        self.vocab_ids = torch.tensor(sorted(set(ids)), dtype=torch.long)
        self.config.draft_vocab = len(self.vocab_ids)

    def vocabulary_weight(self, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """The target's LM head rows of the draft vocabulary: [draft_vocab, h]."""
        if self.vocab_ids.shape[0] == lm_head_weight.shape[0]:
            return lm_head_weight
        return lm_head_weight.index_select(0, self.vocab_ids.to(lm_head_weight.device))

    # -- pieces ------------------------------------------------------------------------------
    def fuse_features(self, low: torch.Tensor, mid: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """[n, h] x 3 -> [n, h]."""
        return self.fuse(torch.cat([low, mid, high], dim=-1))

    def contemplate_embeds(self, last_high: torch.Tensor) -> torch.Tensor:
        """last_high [n, h] (the top feature of the last token with known features) -> [n, k, h]."""
        c = self.config
        gate = torch.softmax(self.expert_gate(last_high), dim=-1)  # [n, e]
        low = torch.einsum("nh,ehr->ner", last_high, self.expert_down)  # [n, e, r]
        mixed = torch.einsum("ne,ner,erk->nk", gate, low, self.expert_up)  # [n, k*h]
        return self.contemplate_prompts[None] + mixed.view(-1, c.contemplate, c.hidden_size)

    def plan_vectors(self, contemplate_features: torch.Tensor) -> torch.Tensor:
        """Fused target features of contemplate rows [..., 3h] -> plan [..., h]."""
        return self.plan(contemplate_features)

    def step(
        self,
        features: torch.Tensor,  # [n, h]: fused target features, or the head's own outputs
        token_embeds: torch.Tensor,  # [n, h]: the target's input embeddings of the next tokens
        positions: torch.Tensor,  # [n] long
        visible: torch.Tensor,  # [n, n_past + n] bool: which cached and new rows each row sees
        past: tuple[torch.Tensor, torch.Tensor] | None = None,  # cached (keys, values) [kv_heads, n_past, d]
        plan: torch.Tensor | None = None,  # [n, h] or None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One pass of the layer: (outputs [n, h], normed outputs for the LM head [n, h], (keys, values) of the new rows)."""
        c = self.config
        n = features.shape[0]
        x = self.in_proj(torch.cat([self.norm_feature(features), self.norm_token(token_embeds)], dim=-1))
        a = self.norm_attn(x)
        q = rope(self.q_proj(a).view(n, c.num_heads, c.head_dim).transpose(0, 1), positions, c.rope_theta)
        k = rope(self.k_proj(a).view(n, c.num_kv_heads, c.head_dim).transpose(0, 1), positions, c.rope_theta)
        v = self.v_proj(a).view(n, c.num_kv_heads, c.head_dim).transpose(0, 1)
        keys, values = (torch.cat([past[0], k], 1), torch.cat([past[1], v], 1)) if past is not None else (k, v)
        group = c.num_heads // c.num_kv_heads
        attn = F.scaled_dot_product_attention(
            q, keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0), attn_mask=visible[None]
        )  # [heads, n, d]
        x = x + self.o_proj(attn.transpose(0, 1).reshape(n, -1))
        m = self.norm_mlp(x)
        x = x + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))
        if plan is not None:
            x = x + plan
        return x, self.norm_out(x), (k, v)

    # -- persistence -------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        atomic_write(d / "head.pt", buffer.getvalue())
        atomic_write(d / "config.json", json.dumps(asdict(self.config), indent=2))

    @staticmethod
    def read_config(directory: str | Path) -> HeadConfig:
        """The config of the head saved in `directory` (without loading its weights)."""
        d = Path(directory)
        if not (d / "config.json").is_file() or not (d / "head.pt").is_file():
            raise InvalidOptionError(
                f"{d} is not a draft-head directory (config.json and head.pt); train one with `specprobe train-head`"
            )
        try:
            raw = json.loads((d / "config.json").read_text())
            raw["feature_layers"] = tuple(raw["feature_layers"])
            return HeadConfig(**raw)
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidOptionError(f"{d / 'config.json'} is not a draft-head config ({e})") from None

    @classmethod
    def load(cls, directory: str | Path) -> "DraftHead":
        d = Path(directory)
        head = cls(DraftHead.read_config(d))
        try:
            head.load_state_dict(torch.load(d / "head.pt", map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001 - any unreadable or mismatched file is the user's input error
            raise InvalidOptionError(f"cannot read the draft head {d / 'head.pt'}: {e}") from None
        head.eval()
        return head

    def check_target(self, target) -> None:
        """A clear error when the head was trained for a different model."""
        c = self.config
        cfg = target.config
        if c.vocab_size != target.vocab_size or c.hidden_size != cfg.hidden_size or max(c.feature_layers) > cfg.num_hidden_layers:
            raise InvalidOptionError(
                f"this draft head was trained for {c.target or 'another model'} (hidden {c.hidden_size}, vocabulary "
                f"{c.vocab_size}); the target has hidden {cfg.hidden_size}, vocabulary {target.vocab_size}"
            )


def target_features(hidden_states: tuple[torch.Tensor, ...], layers: tuple[int, int, int], rows) -> torch.Tensor:
    """The low/mid/high features of `rows` from a forward's hidden_states ([1, q, h] each) -> [n, 3h]."""
    return torch.cat([hidden_states[i][0, rows] for i in layers], dim=-1)
